"""A loopback stand-in for an OpenAI-compatible chat endpoint, for the judge tests."""

import http.server
import json
import threading


def slot_of(user, text):
    """The slot ("A" or "B") whose text contains `text`, in a TL;DR or HH judge prompt."""
    if "Summary A: " in user:
        a = user.split("Summary A: ", 1)[1].split("\nSummary B: ", 1)[0]
    else:
        a = user.split("Assistant Response A: ", 1)[1].split("\n\nAssistant Response B: ", 1)[0]
    return "A" if text in a else "B"


class Stub:
    """A loopback OpenAI-style chat endpoint: answers `good` requests with `answer(user_prompt)` (default: picks
    the summary or response that contains "short"), then HTTP 503. Records every request."""

    def __init__(self, good=10 ** 6, answer=None):
        self.requests, self.good = [], good
        self.answer = answer or (lambda user: f"Final Response: {slot_of(user, 'short')}")
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append((self.path, dict(self.headers), body))
                if len(stub.requests) > stub.good:
                    self.send_response(503)
                    self.end_headers()
                    self.wfile.write(b"overloaded")
                    return
                user = body["messages"][1]["content"]
                reply = {"choices": [{"message": {"role": "assistant", "content": stub.answer(user)}}]}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()
        self.server.server_close()
