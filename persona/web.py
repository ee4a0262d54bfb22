"""A Gradio demo: chat with a persona, pick the model, compare two side by side, see a consistency score.

One base model carries every adapter (as in evaluation), so switching model is instant. Each
reply gets the evaluator's persona score: the MiniLM similarity of the reply to its closest
persona fact (`max_fact_similarity` in `persona.evaluate`; the default evaluation's gold replies
average 0.42).
Binds to 127.0.0.1 unless told otherwise. Messages wait in Gradio's queue, which has a size limit, and
an overlong message gets an error instead of a reply; `python -m persona.loadtest` measures the demo under load.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from persona.chat_format import messages_for
from persona.config import ConfigError
from persona.seeds import derive_seed

# The model stack (torch) is imported where it is used, so `python -m persona` reads the limits below cheaply.
if TYPE_CHECKING:
    from persona.generation import Decoding

log = logging.getLogger(__name__)
DEFAULT_PERSONA = "I love hiking in the mountains. | I have two dogs. | I work as a night nurse."
# Messages waiting beyond this many are refused at once with Gradio's "queue full" error instead of piling up:
# 20 holds the target load (20 chats with a message in flight each) while the wait at the back stays bounded.
QUEUE_SIZE = 20
# Workers per event: generation is serialised by Demo.lock anyway, so more would only hold threads on the lock.
GENERATION_CONCURRENCY = 1
# Longest message answered, in characters: every SPC utterance fits (the longest of its validation split has
# 298), so a longer one is no chat turn the models were trained on, only a slower prompt for everyone queued.
MAX_MESSAGE_CHARS = 500


class Demo:
    """The models, the judge and the one lock that serialises generation (adapters are shared state)."""

    def __init__(self, base: Path, adapters: dict[str, Path], decoding: Decoding, embedding_model: str):
        from persona.chat import load_chat_models
        from persona.judges import Embedder
        present = {name: path for name, path in adapters.items() if (path / "adapter_config.json").exists()}
        self.model, self.tokenizer = load_chat_models(base, present)
        self.policies = ["base", *present]
        self.decoding = decoding
        self.embedder = Embedder(embedding_model)
        self.lock = threading.Lock()

    def answer(self, name: str, facts: list[str], turns: list[tuple[int, str]]) -> tuple[str, float]:
        """The reply of policy `name` to the dialogue so far, and its persona score."""
        from persona.chat import BOT
        from persona.generation import generate
        from persona.models import policy
        decoding = replace(self.decoding, seed=derive_seed(self.decoding.seed, "chat-turn", len(turns)))
        with self.lock, policy(self.model, name) as active:
            reply = generate(active, self.tokenizer, [messages_for(facts, turns, BOT)], decoding)[0].text
        return reply, max(self.embedder.fact_similarity(reply, [facts]))


def render(turns: list[tuple[int, str]], notes: list[str]) -> list[dict]:
    """Turns -> Chatbot messages; each bot reply carries its note (model and persona score)."""
    from persona.chat import USER
    out, replies = [], iter(notes)
    for who, text in turns:
        if who == USER:
            out.append({"role": "user", "content": text})
        else:
            out.append({"role": "assistant", "content": f"{text}\n\n*{next(replies, '')}*"})
    return out


def build_app(demo: Demo, queue_size: int = QUEUE_SIZE, max_message_chars: int = MAX_MESSAGE_CHARS):
    """The page, its queue limited to `queue_size` waiting messages; messages over `max_message_chars` refused."""
    import gradio as gr

    from persona.chat import BOT, USER, parse_persona

    def send(message, persona_text, left, right, side_by_side, state):
        message = (message or "").strip()
        if not message:
            return gr.update(), *views(state), state
        # Checked here, not in a Gradio validator: that one runs between the queue's size check and the enqueue,
        # so a burst of messages would all pass the check and overfill the queue.
        if len(message) > max_message_chars:
            raise gr.Error(f"The message has {len(message)} characters; the limit is {max_message_chars}. Shorten it.")
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
        gr.on([send_button.click, message.submit], send, inputs, outputs, api_name="send")
        reset_button.click(reset, None, [left_chat, right_chat, state])
    return app.queue(max_size=queue_size, default_concurrency_limit=GENERATION_CONCURRENCY)


def serve(base: Path, adapters: dict[str, Path], decoding: Decoding, embedding_model: str, host: str = "127.0.0.1",
          port: int = 7860, block: bool = True, queue_size: int = QUEUE_SIZE,
          max_message_chars: int = MAX_MESSAGE_CHARS):
    """Start the demo; with block=False return the running app (tests)."""
    app = build_app(Demo(base, adapters, decoding, embedding_model), queue_size, max_message_chars)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True)
    return app
