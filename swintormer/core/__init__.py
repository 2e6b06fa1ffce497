"""The shared core under both stages: configuration, the training engine, image I/O, data
(pair discovery, datasets, degradations), metrics, tiling, atomic files, process set-up and the
prior protocol. Nothing here imports the stage-two network (``swintormer.models``) or stage one
(``ldm_prior``); both stand on it."""
