"""`relay fetch`: a resuming download client. Imports nothing of the server."""
