"""Talk to a trained policy: persona parsing, model loading with clear errors, a chat session, the terminal loop.

The session keeps the dialogue as (speaker, text) turns and builds every prompt with
`chat_format.messages_for`, so the bot sees exactly the format it was trained and evaluated on.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from persona.chat_format import messages_for
from persona.config import ConfigError
from persona.generation import Decoding, generate, stream_reply
from persona.seeds import derive_seed

log = logging.getLogger(__name__)
MAX_FACTS = 8  # SPC personas have 3-5 facts; more only dilutes the prompt
MAX_FACT_CHARS = 200
BOT, USER = 0, 1


def parse_persona(text: str | None = None, path: Path | None = None, flag: str = "--persona") -> list[str]:
    """Facts from "fact | fact" text or a file (one per line); empty is an error, overlong is truncated."""
    if path is not None:
        if not path.is_file():
            raise ConfigError(f"--persona-file: {path} does not exist")
        raw, flag = path.read_text().splitlines(), "--persona-file"
    else:
        raw = (text or "").replace("\n", "|").split("|")
    facts = [fact.strip() for fact in raw if fact.strip()]
    if not facts:
        raise ConfigError(f"{flag}: the persona is empty; give facts like \"I love hiking | I have two dogs\"")
    if len(facts) > MAX_FACTS:
        log.warning("%s: %d facts, keeping the first %d", flag, len(facts), MAX_FACTS)
        facts = facts[:MAX_FACTS]
    long = [f for f in facts if len(f) > MAX_FACT_CHARS]
    if long:
        log.warning("%s: %d fact(s) over %d characters truncated", flag, len(long), MAX_FACT_CHARS)
    return [f[:MAX_FACT_CHARS] for f in facts]


def load_chat_models(base: Path, adapters: dict[str, Path]):
    """The base model with each adapter attached by name (`base` = adapters disabled).

    Missing folders and adapters trained on another base model fail with a message naming them.
    """
    from persona.models import load_policies

    if not (base / "config.json").exists():
        raise ConfigError(f"--base: no saved model in {base}; run `dvc repro base` first")
    for path in adapters.values():
        if not (path / "adapter_config.json").exists():
            raise ConfigError(f"--adapter: no LoRA adapter in {path} (expected adapter_config.json); "
                              f"run its stage (sft or align) first")
    try:
        return load_policies(base, adapters, param="--adapter")
    except (RuntimeError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0][:300]
        raise ConfigError(f"--adapter: {', '.join(map(str, adapters.values()))} does not fit the base model {base} "
                          f"(was it trained on another one?): {reason}") from None


@dataclass
class ChatSession:
    """One conversation with one persona; the bot is speaker 0, the person speaker 1."""
    model: object
    tokenizer: object
    facts: list[str]
    decoding: Decoding = field(default_factory=Decoding)
    turns: list[tuple[int, str]] = field(default_factory=list)

    def messages(self) -> list[dict]:
        return messages_for(self.facts, self.turns, BOT)

    def reply(self, message: str, on_text=None) -> str:
        """Answer `message`; `on_text(piece)` receives the reply as it is generated."""
        self.turns.append((USER, message))
        decoding = replace(self.decoding, seed=derive_seed(self.decoding.seed, "chat-turn", len(self.turns)))
        if on_text is None:
            answer = generate(self.model, self.tokenizer, [self.messages()], decoding)[0].text
        else:
            answer = stream_reply(self.model, self.tokenizer, self.messages(), decoding, on_text).text
        self.turns.append((BOT, answer))
        return answer

    def reset(self) -> None:
        self.turns.clear()


HELP = "/reset clears the conversation, /persona <fact | fact> sets a new persona, /quit leaves"


def run_terminal(session: ChatSession, read=input, write=sys.stdout.write) -> None:
    """The interactive loop: each reply streams as it is generated."""
    write(f"persona: {' | '.join(session.facts)}\n{HELP}\n")
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        if not line:
            continue
        if line == "/quit":
            return
        if line == "/reset":
            session.reset()
            write("(conversation cleared)\n")
        elif line.startswith("/persona"):
            try:
                session.facts = parse_persona(line[len("/persona"):], flag="/persona")
            except ConfigError as error:
                write(f"{error}\n")
                continue
            session.reset()
            write(f"(new persona: {' | '.join(session.facts)}; conversation cleared)\n")
        elif line.startswith("/"):
            write(f"unknown command {line.split()[0]}; {HELP}\n")
        else:
            write("bot> ")
            session.reply(line, on_text=write)
            write("\n")
