"""`tunelab board`: a local web dashboard over run folders (runs, curves, data masks, evaluations, chat).

runs.py and data.py read run folders (no web framework); chat.py runs the base and tuned models; app.py is
the Starlette app; cli.py starts it; static/ is the front end (plain JavaScript, no CDN). API: docs/board.md.
"""
