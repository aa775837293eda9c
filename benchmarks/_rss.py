"""Run a command and print, as the last line of stdout, the peak resident memory of the largest process of its tree
(RUSAGE_CHILDREN once it has ended: children and, through them, their waited-for children such as torchrun's
workers), as JSON {"max_rss": bytes, "rc": exit status}. Exits with the command's status.

    python benchmarks/_rss.py CMD ARGS...
"""

import json
import resource
import subprocess
import sys

rc = subprocess.run(sys.argv[1:]).returncode
print(json.dumps({"max_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024, "rc": rc}), flush=True)
sys.exit(rc)
