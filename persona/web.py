"""A Gradio demo: chat with a persona, pick the model, compare two side by side, see a consistency score.

One base model carries every adapter (as in evaluation), so switching model is instant. Each
reply gets the evaluator's persona score: the MiniLM similarity of the reply to its closest
persona fact (`max_fact_similarity` in `persona.evaluate`; the default evaluation's gold replies
average 0.42).
Binds to 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path

from persona.chat import BOT, USER, load_chat_models, parse_persona
from persona.chat_format import messages_for
from persona.config import ConfigError
from persona.generation import Decoding, generate
from persona.models import policy
from persona.seeds import derive_seed

log = logging.getLogger(__name__)
DEFAULT_PERSONA = "I love hiking in the mountains. | I have two dogs. | I work as a night nurse."


class Demo:
    """The models, the judge and the one lock that serialises generation (adapters are shared state)."""

    def __init__(self, base: Path, adapters: dict[str, Path], decoding: Decoding, embedding_model: str):
        from persona.judges import Embedder
        present = {name: path for name, path in adapters.items() if (path / "adapter_config.json").exists()}
        self.model, self.tokenizer = load_chat_models(base, present)
        self.policies = ["base", *present]
        self.decoding = decoding
        self.embedder = Embedder(embedding_model)
        self.lock = threading.Lock()

    def answer(self, name: str, facts: list[str], turns: list[tuple[int, str]]) -> tuple[str, float]:
        """The reply of policy `name` to the dialogue so far, and its persona score."""
        decoding = replace(self.decoding, seed=derive_seed(self.decoding.seed, "chat-turn", len(turns)))
        with self.lock, policy(self.model, name) as active:
            reply = generate(active, self.tokenizer, [messages_for(facts, turns, BOT)], decoding)[0].text
        return reply, max(self.embedder.fact_similarity(reply, [facts]))


def render(turns: list[tuple[int, str]], notes: list[str]) -> list[dict]:
    """Turns -> Chatbot messages; each bot reply carries its note (model and persona score)."""
    out, replies = [], iter(notes)
    for who, text in turns:
        if who == USER:
            out.append({"role": "user", "content": text})
        else:
            out.append({"role": "assistant", "content": f"{text}\n\n*{next(replies, '')}*"})
    return out


def build_app(demo: Demo):
    import gradio as gr

    def send(message, persona_text, left, right, side_by_side, state):
        message = (message or "").strip()
        if not message:
            return gr.update(), *views(state), state
        try:
            facts = parse_persona(persona_text, flag="persona")
        except ConfigError as error:
            raise gr.Error(str(error)) from None
        if facts != state["facts"]:  # a new persona starts a new conversation
            state = fresh(facts)
        for side, name in (("left", left), ("right", right)):
            if side == "right" and not side_by_side:
                continue
            turns = state[side]["turns"] + [(USER, message)]
            reply, score = demo.answer(name, facts, turns)
            state[side]["turns"] = turns + [(BOT, reply)]
            state[side]["notes"].append(f"{name} · persona score {score:.2f}")
        return "", *views(state), state

    def views(state):
        return render(state["left"]["turns"], state["left"]["notes"]), \
            render(state["right"]["turns"], state["right"]["notes"])

    def fresh(facts=None):
        return {"facts": facts, "left": {"turns": [], "notes": []}, "right": {"turns": [], "notes": []}}

    def reset():
        state = fresh()
        return *views(state), state

    with gr.Blocks(title="persona-rlhf demo") as app:
        gr.Markdown("### Chat with a persona bot\nFacts separated by `|`. Each reply shows the model and its "
                    "persona score (similarity to the closest fact; dataset replies average about 0.4).")
        persona_box = gr.Textbox(DEFAULT_PERSONA, label="Persona", elem_id="persona")
        with gr.Row():
            left_model = gr.Radio(demo.policies, value=demo.policies[-1], label="Model", elem_id="model-left")
            side_by_side = gr.Checkbox(False, label="Side by side", elem_id="side-by-side")
            right_model = gr.Radio(demo.policies, value=demo.policies[0], label="Second model",
                                   elem_id="model-right")
        with gr.Row():
            left_chat = gr.Chatbot(label="Model", elem_id="chat-left")
            right_chat = gr.Chatbot(label="Second model", elem_id="chat-right")
        message = gr.Textbox(label="Message", placeholder="Say hi", elem_id="message")
        with gr.Row():
            send_button = gr.Button("Send", variant="primary", elem_id="send")
            reset_button = gr.Button("Reset", elem_id="reset")
        state = gr.State(fresh())
        inputs = [message, persona_box, left_model, right_model, side_by_side, state]
        outputs = [message, left_chat, right_chat, state]
        send_button.click(send, inputs, outputs)
        message.submit(send, inputs, outputs)
        reset_button.click(reset, None, [left_chat, right_chat, state])
    return app


def serve(base: Path, adapters: dict[str, Path], decoding: Decoding, embedding_model: str, host: str = "127.0.0.1",
          port: int = 7860, block: bool = True):
    """Start the demo; with block=False return the running app (tests)."""
    app = build_app(Demo(base, adapters, decoding, embedding_model))
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True)
    return app
