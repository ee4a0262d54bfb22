"""DVC stage `plots`: the training curves in dvclive/<stage> -> metrics/curves_<stage>.png, readable offline.

No params and no metrics file: it only draws what the training stages logged.
"""
from persona.plots import main

main()
