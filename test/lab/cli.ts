/** `pnpm lab up|down|status|exec <host> -- cmd…|kill|freeze|thaw|cut|restore|restart <host>` */
import { cutLink, execIn, freezeHost, killHost, labDown, labStatus, labUp, LAB_HOSTS, restartHost, restoreLink, thawHost, type LabHostName } from './lab.js';

const [command, hostArg, ...rest] = process.argv.slice(2);
const host = (): LabHostName => {
  if (!LAB_HOSTS.includes(hostArg as LabHostName)) {
    console.error(`lab: expected a host (${LAB_HOSTS.join(', ')}), got ${JSON.stringify(hostArg)}`);
    process.exit(2);
  }
  return hostArg as LabHostName;
};

switch (command) {
  case 'up':
    await labUp();
    console.table(await labStatus());
    break;
  case 'down':
    await labDown();
    break;
  case 'status':
    console.table(await labStatus());
    break;
  case 'exec': {
    const argv = rest[0] === '--' ? rest.slice(1) : rest;
    const result = await execIn(host(), argv).nothrow();
    process.stdout.write(result.stdout);
    process.stderr.write(result.stderr);
    process.exit(result.exitCode ?? 1);
  }
  // falls through (unreachable: process.exit above)
  case 'kill':
    await killHost(host());
    break;
  case 'freeze':
    await freezeHost(host());
    break;
  case 'thaw':
    await thawHost(host());
    break;
  case 'cut':
    await cutLink(host());
    break;
  case 'restore':
    await restoreLink(host());
    break;
  case 'restart':
    await restartHost(host());
    break;
  default:
    console.error('usage: lab up|down|status|exec <host> -- cmd…|kill|freeze|thaw|cut|restore|restart <host>');
    process.exit(2);
}
