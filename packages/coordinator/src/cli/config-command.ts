import { ConfigError, loadAgentConfig, type AgentConfig } from '../config/agent-config.js';

export type ConfigCheck = { file: string; ok: true; config: AgentConfig } | { file: string; ok: false; problems: readonly string[] };

/** `ftvm config check FILE`: loads and validates the agent config; other errors (bugs) are thrown. */
export function checkConfig(file: string): ConfigCheck {
  try {
    return { file, ok: true, config: loadAgentConfig(file) };
  } catch (error) {
    if (error instanceof ConfigError) return { file, ok: false, problems: error.problems };
    throw error;
  }
}

export function formatConfigCheck(check: ConfigCheck): string {
  if (!check.ok) return `${check.file}: invalid config\n${check.problems.map((p) => `  - ${p}`).join('\n')}`;
  const { config } = check;
  const vms = config.vms.map((vm) => `${vm.name} (${vm.primary} → ${vm.backup})`).join(', ') || 'none';
  return `${check.file}: ok — this host is ${config.host}; hosts: ${Object.keys(config.hosts).join(', ')}; VMs: ${vms}`;
}
