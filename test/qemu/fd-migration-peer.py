#!/usr/bin/env python3
"""The migration peer of checkpoint-edges.ts's send-buffer checks (patch 0014).

Hands QEMU a migration socket the caller has sized, reads the stream away, and reports that
socket's SO_SNDBUF while QEMU holds it: the fd passed with SCM_RIGHTS is the same socket as the
one kept here, so getsockopt on our copy reads the buffer QEMU left on it. Node cannot pass file
descriptors or set SO_SNDBUF, hence Python.

    fd-migration-peer.py <qmp socket> <unix-default|unix-large|tcp-small>

Connects to its own QMP monitor (`getfd` names are per monitor, so `migrate fd:` goes out on the
same one), prints `before <bytes>`, and answers each `query` line on stdin with `now <bytes>`;
`quit` (or EOF) ends it. Errors go to stderr with exit status 1.
"""
import array
import json
import socket
import sys
import threading

SO_SNDBUFFORCE = getattr(socket, 'SO_SNDBUFFORCE', 32)


def sndbuf(sock):
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)


def drain(sock):
    try:
        while sock.recv(1 << 20):
            pass
    except OSError:
        pass


def sockets(mode):
    """(the end QEMU gets, the end read here) for the mode, sized as it says."""
    if mode in ('unix-default', 'unix-large'):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        if mode == 'unix-large':
            # 16 MiB as getsockopt reports it: more than the patch's 4 MiB (8 MiB reported), and
            # above net.core.wmem_max, so only SO_SNDBUFFORCE (root) can set it
            theirs.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, 8 << 20)
        return theirs, ours
    if mode == 'tcp-small':
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(('127.0.0.1', 0))
        listener.listen(1)
        theirs = socket.create_connection(listener.getsockname())
        ours, _ = listener.accept()
        listener.close()
        # a fixed (locked) size: TCP autotuning would move it otherwise
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        return theirs, ours
    raise SystemExit(f'unknown mode {mode!r} (unix-default, unix-large or tcp-small)')


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(path)
        self.buf = b''
        self.read()  # greeting
        self.execute('qmp_capabilities')

    def read(self):
        while b'\n' not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit('QMP closed')
            self.buf += chunk
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def execute(self, command, arguments=None, fds=None):
        message = json.dumps({'execute': command, **({'arguments': arguments} if arguments else {})}).encode() + b'\n'
        if fds:
            self.sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array('i', fds))])
        else:
            self.sock.sendall(message)
        while True:
            reply = self.read()
            if 'return' in reply:
                return reply['return']
            if 'error' in reply:
                raise SystemExit(f'{command}: {reply["error"]["desc"]}')
            # an event: not ours to handle


def main():
    if len(sys.argv) != 3:
        raise SystemExit('usage: fd-migration-peer.py <qmp socket> <unix-default|unix-large|tcp-small>')
    qmp = Qmp(sys.argv[1])
    theirs, ours = sockets(sys.argv[2])
    threading.Thread(target=drain, args=(ours,), daemon=True).start()
    print(f'before {sndbuf(theirs)}', flush=True)
    qmp.execute('getfd', {'fdname': 'ftvm-mig'}, fds=[theirs.fileno()])
    qmp.execute('migrate', {'uri': 'fd:ftvm-mig'})
    for line in sys.stdin:
        if line.strip() == 'query':
            print(f'now {sndbuf(theirs)}', flush=True)
        elif line.strip() == 'quit':
            break


if __name__ == '__main__':
    main()
