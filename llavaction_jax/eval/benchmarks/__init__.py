"""The paper's other video benchmarks (EgoSchema, PerceptionTest, LongVideoBench, Video-MME, MVBench, NExT-QA)
through our batched evaluator.

Each benchmark is one module with ``add_arguments(parser)`` (its official annotation files) and ``build(args)``,
which returns the lmms-eval task variants it yields as question files (common.py describes them). Prompts, answer
parsing (parsers.py) and scoring (score.py) follow lmms-eval's task code so a converted model scores what
lmms-eval reports; ``build-bench`` (build.py) writes the files, ``eval`` scores them, ``eval-suite`` (suite.py)
runs several and writes one table. docs/benchmarks.md lists the sources of every format.
"""

from __future__ import annotations

from llavaction_jax.eval.benchmarks import egoschema, longvideobench, mvbench, nextqa, perceptiontest, videomme

BENCHMARKS = {module.__name__.rsplit(".", 1)[-1]: module
              for module in (egoschema, perceptiontest, longvideobench, videomme, mvbench, nextqa)}
VARIANTS = {variant.name: variant for module in BENCHMARKS.values() for variant in module.VARIANTS}
