"""``aipipe demo``: the tour (``tour``) and its moments (``budget``, ``circuit``)."""
