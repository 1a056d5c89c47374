"""Speed measured against a named peer in the same run (`glmkit bench WHAT`).

One module per benchmark (`data`, `train`, `generate`, `engine`, `quantize`), each with an options dataclass and a function
that runs it and returns a result dict (with at least the keys its issue names and `ratio`); human-
readable lines go to the `log` callable it is given. `glmkit.cli.bench` owns the options and printing.
"""
