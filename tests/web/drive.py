"""Drives the web page of `strata serve` in headless Chromium over the DevTools protocol.

usage: drive.py URL SCREENSHOT.png [API_KEY]
Loads the page (given a key: answers its key form, first with a wrong key, which must be
refused, then with the right one), sends a chat message, waits for streamed text and for the cluster view,
and saves a screenshot. Prints one JSON object; exits non-zero when a check fails.
Needs `chromium` (Debian) and `websocket-client` (PyPI).
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

import websocket


def main():
    url, shot = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else None
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        raise SystemExit("chromium is missing: run `bash scripts/setup.sh --test`")
    profile = tempfile.mkdtemp(prefix="strata-chromium-")
    proc = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--window-size=1200,800", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ws_url = None
        deadline = time.time() + 60
        while time.time() < deadline and ws_url is None:
            line = proc.stderr.readline()
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
        if not ws_url:
            raise SystemExit("chromium did not start its DevTools server")
        port = re.search(r":(\d+)/", ws_url).group(1)
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json"))
        page = next(t for t in targets if t["type"] == "page")
        ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60)
        counter = [0]

        def call(method, **params):
            counter[0] += 1
            ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
            while True:
                msg = json.loads(ws.recv())
                if msg.get("id") == counter[0]:
                    if "error" in msg:
                        raise RuntimeError(f"{method}: {msg['error']}")
                    return msg.get("result", {})

        def js(expr):
            r = call("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
            if "exceptionDetails" in r:
                raise RuntimeError(f"{expr}: {r['exceptionDetails']}")
            return r["result"].get("value")

        def wait(expr, what, timeout=300):
            end = time.time() + timeout
            while time.time() < end:
                v = js(expr)
                if v:
                    return v
                time.sleep(0.2)
            raise AssertionError(f"timed out waiting for {what}")

        call("Page.enable")
        call("Page.navigate", url=url)
        wait("document.readyState === 'complete' && !!document.getElementById('composer')", "the page")
        if key:
            def answer(k):
                wait("!document.getElementById('key-form').hidden", "the API key form")
                js(f"document.getElementById('api-key').value = {json.dumps(k)};"
                   "document.getElementById('key-form').requestSubmit(); true")
            answer("not-the-key")
            wait("document.getElementById('summary').textContent.includes('refused')", "the wrong key refused")
            answer(key)
        wait("document.querySelectorAll('#nodes .node .bar span').length >= 4", "the cluster view")
        js("document.getElementById('max-tokens').value = '24'; document.getElementById('temperature').value = '0';"
           "document.getElementById('input').value = 'Say hello in one sentence.';"
           "document.getElementById('composer').requestSubmit(); true")
        # Streaming: text shows while the answer is still in progress, then it finishes.
        partial = wait("(() => { const m = document.querySelector('.msg.assistant.streaming'); return m && m.textContent.length > 0 ? m.textContent : null })()",
                       "streamed text while the answer is in progress")
        final = wait("(() => { const m = document.querySelector('.msg.assistant:not(.streaming) .meta'); return m ? m.parentElement.textContent : null })()",
                     "the finished answer")
        error = js("!!document.querySelector('.msg.error')")
        cluster = js("document.getElementById('summary').textContent + ' | ' + document.getElementById('nodes').textContent")
        rate = js("document.getElementById('rate').textContent")
        shot_data = call("Page.captureScreenshot", format="png")["data"]
        with open(shot, "wb") as f:
            f.write(base64.b64decode(shot_data))
        result = {"partial": partial, "final": final, "error": error, "cluster": cluster, "rate": rate}
        print(json.dumps(result))
        if error or not final.strip() or "layers" not in cluster or "KV pool" not in cluster or "busy" not in cluster:
            raise SystemExit(f"page checks failed: {result}")
        ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
