import net from 'node:net';
import { QmpConnectionClosedError, QmpTimeoutError } from './errors.js';

/** Where a monitor listens: a unix socket path, or host and port for a TCP monitor. */
export type SocketTarget = { path: string } | { host: string; port: number };

export function describeTarget(target: SocketTarget): string {
  return 'path' in target ? target.path : `${target.host}:${target.port}`;
}

/** Connects with a deadline; a refused or missing socket fails at once with the target named. */
export function connectSocket(target: SocketTarget, timeoutMs: number): Promise<net.Socket> {
  return new Promise((resolve, reject) => {
    const socket = 'path' in target ? net.createConnection(target.path) : net.createConnection(target.port, target.host);
    const timer = setTimeout(() => {
      socket.destroy();
      reject(new QmpTimeoutError(`connect ${describeTarget(target)}`, timeoutMs));
    }, timeoutMs);
    socket.once('connect', () => {
      clearTimeout(timer);
      socket.setNoDelay(true);
      resolve(socket);
    });
    socket.once('error', (error) => {
      clearTimeout(timer);
      socket.destroy();
      reject(new QmpConnectionClosedError(undefined, `connect ${describeTarget(target)}: ${error.message}`));
    });
  });
}
