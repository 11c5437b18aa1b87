export { SshConnection, SshError, type SshEndpoint, type SshTimeouts } from './ssh-connection.js';
export { fingerprintOfKeyBlob, fingerprintOfPublicKeyLine } from './host-key.js';
