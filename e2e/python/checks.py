"""One line per check of the client scripts (openai_client.py, lora_client.py);
the first failure ends the script with a non-zero status."""

import sys


def check(name, condition, detail=""):
    if not condition:
        print(f"FAIL {name}: {detail}", file=sys.stderr)
        sys.exit(1)
    print(f"ok   {name}")
