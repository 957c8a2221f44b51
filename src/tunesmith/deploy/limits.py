"""The serving limits' defaults, written once: the engine, the HTTP app and `tunesmith serve --help` read them
from here (this module imports nothing heavy, so the CLI's help does not load torch)."""

QUEUE_SIZE = 64  # requests that may wait for the model, not counting those generating; more get 503
MAX_BATCH = 8  # most requests generating at once (rows of the running batch)
MAX_TOKENS_LIMIT = 1024  # largest max_tokens a request may ask for
DEFAULT_MAX_TOKENS = 256  # max_tokens when a request gives none
MAX_BODY_BYTES = 4 * 2**20  # largest request body; a larger one gets 413 before it is read
RETRY_AFTER_MAX_S = 60  # the longest a busy server asks a client to wait
# Feedback becomes training data (`monitor --export`): a correction is one answer, not a file, and one response
# gathers a few verdicts at most, so no client can flood the next training set through one id.
MAX_CORRECTION_BYTES = 64 * 2**10  # largest correction, in UTF-8 bytes
MAX_COMMENT_BYTES = 8 * 2**10  # largest comment, in UTF-8 bytes
MAX_FEEDBACK_PER_RESPONSE = 5  # feedback rows one response id may gather; more get 409
