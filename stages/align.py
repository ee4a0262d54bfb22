"""DVC stage `align`: the SFT adapter aligned by `align.algorithm` into models/policy (started by persona.launch)."""
from persona.align import run
from persona.runner import main

main("align", run)
