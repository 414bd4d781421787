"""Side-by-side benchmarks of fastsana against diffusers (never run in CI).

    .venv/bin/python -m bench compare --what dit --dtype bf16 --sizes 512,1024
    .venv/bin/python -m bench scaling
    .venv/bin/python -m bench profile --size 1024 --dtype bf16

See ``python -m bench --help`` and docs/benchmarks.md.
"""
