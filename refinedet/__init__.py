"""The ``refinedet`` command: the top floor, above every package it dispatches to (``refinedet.cli``)."""
