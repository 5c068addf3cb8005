"""Objective evaluation of enhanced speech folders.

`metrics` scores one signal (PESQ, ESTOI, SI-SDR, DNSMOS); `scoring` picks the metrics and scores
every file in worker processes; `report` turns the scores into statistics and files; `plots`
draws spectrograms; `run.evaluate` does all of it for one set of folders.
"""
