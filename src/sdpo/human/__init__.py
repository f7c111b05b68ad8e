"""People as the yardstick: a local labelling page (``sdpo label``) whose answers become preference
pairs (``sdpo pairs --from-labels``), and a blind A/B page over an evaluation (``sdpo rate``).

* :mod:`sdpo.human.answers`: the per-rater answers file (append-only JSONL, fsynced per answer);
* :mod:`sdpo.human.queue`: which items a rater sees, in a seeded order, with seeded left/right placement;
* :mod:`sdpo.human.media`: the only files a page may serve, checked (inside the folder, readable);
* :mod:`sdpo.human.session`: a rater's session behind the page's calls (state, answer, undo, end);
* :mod:`sdpo.human.server`: the small Starlette app both pages run on;
* :mod:`sdpo.human.label`: ``sdpo label``'s session over a generate folder;
* :mod:`sdpo.human.agreement`: raw agreement, Cohen's and Fleiss' kappa;
* :mod:`sdpo.human.label_pairs`: answers -> ``pairs.jsonl`` by majority;
* :mod:`sdpo.human.rate`: the blind evaluation page and its results in the evaluation's report.

Needs the ``human`` extra (``pip install 'sdpo[human]'``: starlette, uvicorn).
"""
