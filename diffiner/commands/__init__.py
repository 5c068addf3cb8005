"""The command-line programs: each module parses its flags, calls the library and prints.

`refine` (diffiner-refine, scripts/run_refiner.py), `train` (diffiner-train, scripts/train.py),
`sample_prior` (diffiner-sample, scripts/sample.py), `evaluate` (diffiner-evaluate,
scripts/evaluate.py), `enhance` (diffiner-enhance), `resample_audio` (diffiner-resample) and
`make_noisy_set` (the demo's noisy clips). Run any of them with `python -m diffiner.commands.NAME`.
"""
