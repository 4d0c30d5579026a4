"""The metrics oliver006/redis_exporter exports (namespace `redis`), read from its Go sources at one tag, as
metrics-<tag>.txt lists them: one line per metric, its name then its labels (comma-separated; "-" for none,
"*" where the sources do not list them in one place).

    git clone https://github.com/oliver006/redis_exporter && cd redis_exporter
    python <this file> v1.88.0 > metrics-v1.88.0.txt      # then put the header lines back
"""

from __future__ import annotations

import re
import subprocess
import sys


def git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout


def main(tag: str) -> None:
    files = [f for f in git("ls-tree", "-r", "--name-only", tag, "exporter").split() if f.endswith(".go")]
    labels: dict[str, str] = {}
    for path in (f for f in files if not f.endswith("_test.go")):
        src = git("show", f"{tag}:{path}")
        # INFO fields exported as unlabelled gauges and counters
        for block in re.findall(r"metricMap(?:Gauges|Counters): map\[string\]string\{(.*?)\n\t\t\}", src, re.S):
            for name in re.findall(r'"[^"]+":\s*"([^"]+)"', block):
                labels.setdefault(name, "-")
        # described metrics: "name": {txt: `...`, lbls: []string{"a", "b"}}
        for name, body in re.findall(r'^\t\t"([a-z0-9_]+)":\s*\{txt:(.*)$', src, re.M):
            found = re.search(r"lbls:\s*\[\]string\{([^}]*)\}", body)
            labels[name] = (",".join(re.findall(r'"([^"]+)"', found[1])) or "-") if found else "-"
        # registered directly by name, or made with client_golang's own constructors
        for pattern in (r'registerConst\w*\(\s*ch,\s*"([a-z0-9_]+)"', r'Name:\s*"([a-z0-9_]+)"'):
            for name in re.findall(pattern, src):
                labels.setdefault(name, "*")
    for name in sorted(labels):
        print(f"redis_{name} {labels[name]}")


if __name__ == "__main__":
    main(sys.argv[1])
