"""Objective evaluation of enhanced speech folders.

`metrics` scores one signal (PESQ, ESTOI, SI-SDR, DNSMOS); `nisqa` adds NISQA through torchmetrics
(its weights and its scores); `scoring` picks the metrics and scores every file in worker
processes, setting a failed output's scores to their floor and leaving out of every system a file
a metric cannot score; `report` turns the scores into statistics and files; `plots` draws
spectrograms; `run.evaluate` does all of it for one set of folders.
"""
