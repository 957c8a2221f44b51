"""`tunesmith ui`: a local web app over the same run directories and data files the CLI uses.

It reads what the stages write and calls the stages' own functions; it keeps no second copy of any result, and it
never reads or writes outside the runs and data folders it was started on (and tunesmith's own caches).
"""
