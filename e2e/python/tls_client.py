"""The router's HTTPS face with the official `openai` client (run by
e2e/tests/tls.rs with the virtualenv's Python).

  tls_client.py chat URL CA MODEL   wait for /readyz over HTTPS, check that plain
                                    HTTP is not served there, stream a chat
                                    completion; prints JSON: the answer and the
                                    negotiated protocol
  tls_client.py served URL CA       prints the SHA-256 of the certificate served now
"""

import hashlib
import json
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import openai


def context(ca):
    return ssl.create_default_context(cafile=ca)


def wait_ready(url, ca):
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/readyz", context=context(ca), timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, ssl.SSLError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url}/readyz not ready over HTTPS within 120 s")
        time.sleep(0.3)


def plain_http_refused(url):
    parsed = urllib.parse.urlparse(url)
    try:
        with urllib.request.urlopen(f"http://{parsed.hostname}:{parsed.port}/readyz", timeout=5) as r:
            return f"plain HTTP answered {r.status}"
    except Exception:  # the TLS listener drops a plaintext request
        return None


def served(url, ca):
    parsed = urllib.parse.urlparse(url)
    with socket.create_connection((parsed.hostname, parsed.port), timeout=5) as tcp:
        with context(ca).wrap_socket(tcp, server_hostname=parsed.hostname) as tls:
            return hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()


def chat(url, ca, model):
    wait_ready(url, ca)
    problem = plain_http_refused(url)
    if problem:
        sys.exit(problem)
    with openai.DefaultHttpxClient(verify=context(ca)) as http_client:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", http_client=http_client)
        text = ""
        finish = None
        for chunk in client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Say hello."}],
            max_tokens=8,
            temperature=0,
            stream=True,
        ):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
    print(json.dumps({"text": text, "finish_reason": finish}))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "chat":
        chat(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode == "served":
        print(served(sys.argv[2], sys.argv[3]))
    else:
        sys.exit(f"unknown mode {mode}")
