import http from 'node:http';
import https from 'node:https';
import net from 'node:net';

/** What the hook tells the local coordinator. One JSON object (one line on a unix socket). */
export interface HookMessage {
  v: 1;
  op: 'protect' | 'unprotect';
  /** The libvirt hook operation that caused it: started, reconnect, stopped, release. */
  phase: string;
  domain: string;
  uuid: string | undefined;
  /** This host's name (os.hostname()). */
  host: string;
  /** ISO time the hook sent it. */
  at: string;
  /** ftvm's metadata of the domain (protect only). */
  protection?: unknown;
}

export interface NotifyResult {
  delivered: boolean;
  /** "HTTP 200", "ack: ok", "closed", or the failure. */
  detail: string;
  ms: number;
}

/**
 * Endpoint forms: `http://host:port/path` or `https://…` (POST, JSON body, any 2xx is delivered);
 * `unix:/path` or an absolute path (one JSON line; delivered when the peer answers with a line,
 * e.g. `ok`).
 */
export type Endpoint = { kind: 'http'; url: URL } | { kind: 'unix'; path: string };

export function parseEndpoint(text: string): Endpoint {
  if (/^https?:\/\//.test(text)) return { kind: 'http', url: new URL(text) };
  const path = text.startsWith('unix:') ? text.slice('unix:'.length) : text;
  if (!path.startsWith('/')) throw new Error(`endpoint ${JSON.stringify(text)}: expected http(s)://… or a unix socket path (unix:/path or /path)`);
  return { kind: 'unix', path };
}

/** Sends `message` and waits at most `timeoutMs` for the peer's acknowledgement. Never throws. */
export function notify(endpoint: Endpoint, message: HookMessage, timeoutMs: number): Promise<NotifyResult> {
  const started = performance.now();
  const body = JSON.stringify(message);
  return new Promise<NotifyResult>((resolve) => {
    let settled = false;
    const finish = (delivered: boolean, detail: string) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      cleanup();
      resolve({ delivered, detail, ms: Math.round((performance.now() - started) * 10) / 10 });
    };
    let cleanup = () => undefined as void;
    const timer = setTimeout(() => finish(false, `no answer within ${timeoutMs} ms`), timeoutMs);

    if (endpoint.kind === 'unix') {
      const socket = net.connect(endpoint.path);
      cleanup = () => socket.destroy();
      let reply = '';
      socket.setEncoding('utf8');
      socket.on('connect', () => socket.write(`${body}\n`));
      socket.on('data', (chunk: string) => {
        reply += chunk;
        const nl = reply.indexOf('\n');
        if (nl >= 0) finish(true, `ack: ${reply.slice(0, nl).slice(0, 200)}`);
      });
      socket.on('end', () => finish(reply !== '', reply ? `ack: ${reply.slice(0, 200)}` : 'closed without an answer'));
      socket.on('error', (error) => finish(false, error.message));
      return;
    }
    const client = endpoint.url.protocol === 'https:' ? https : http;
    const req = client.request(endpoint.url, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    cleanup = () => req.destroy();
    req.on('response', (res) => {
      res.resume();
      const ok = (res.statusCode ?? 0) >= 200 && (res.statusCode ?? 0) < 300;
      finish(ok, `HTTP ${res.statusCode}`);
    });
    req.on('error', (error) => finish(false, error.message));
    req.end(body);
  });
}
