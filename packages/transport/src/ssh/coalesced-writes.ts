import type { Socket } from 'node:net';

/**
 * ssh2 writes every SSH packet (at most 32 KiB of channel data, sshd's packet limit) to its socket
 * on its own: a syscall and a TCP push per packet. Corking the socket for the rest of the
 * event-loop turn hands the kernel the turn's packets in one writev instead. On the lab's 2-core
 * host that cut the sending process's CPU for a 464 MB transfer from 1.3 s to 0.85 s.
 *
 * The delay is bounded by one loop turn, so handshakes, keepalives and replies are not held back.
 */
export function coalesceWrites(socket: Socket): Socket {
  const write = socket.write.bind(socket) as (...args: unknown[]) => boolean;
  let corked = false;
  const uncork = () => {
    corked = false;
    socket.uncork();
  };
  socket.write = ((...args: unknown[]) => {
    if (!corked) {
      corked = true;
      socket.cork();
      setImmediate(uncork);
    }
    return write(...args);
  }) as Socket['write'];
  return socket;
}
