"""The science: μA's regime table (theory), η* per (regime, rank) from measured trials (optimum, rank_optima),
the fitted rank exponents (fit), and predicted learning rates (transfer, calibration).

No torch, no training: these read trials as a table and give numbers. May import: `mua_cli.errors` only.
"""
