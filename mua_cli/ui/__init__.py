"""The terminal: the `mua` command (cli), its tables and panels (report), the fit's plot (plots) and live
progress (progress). Nothing below this folder prints.

May import: `api` and everything it builds on.
"""
