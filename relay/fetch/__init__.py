"""`relay fetch`: a resuming download client. Imports nothing of the server.

fetcher.py   options, one run on `relay.transfer` (the engine download jobs use too),
             what the user is told, the translation of failures into exit codes
client.py    requests with httpx's blocking client, as the engine's Opener
output.py    FILE.part's resume record (FILE.part.json), publishing to FILE; stdout
progress.py  the progress bar; errors.py the exit codes and their errors
"""
