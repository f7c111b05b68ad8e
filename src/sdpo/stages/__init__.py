"""The stages every family runs: generate -> score -> pairs (-> precompute -> train) -> evaluate.

Each stage is a library function taking a loaded spec and/or a folder and writing files
(``sdpo.stages.generate.generate``, ``sdpo.stages.score.score``, ``sdpo.stages.pairs.build_pairs``,
``sdpo.stages.evaluate.evaluate``); the CLI commands of the same names call them.
"""
