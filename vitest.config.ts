import { defineConfig } from 'vitest/config';

// Two projects: `unit` is pure (parsers, state machines, fakes allowed); `integration` drives real
// QEMU, libvirtd, sshd and network namespaces, so it runs one file at a time with long timeouts.
// Workspace packages resolve to their TypeScript sources in tests (the `@ftvm/source` export
// condition), so tests never run against a stale dist/.
const resolve = { conditions: ['@ftvm/source', 'import', 'node', 'default'] };
const ssr = { resolve: { conditions: ['@ftvm/source', 'import', 'node', 'default'], externalConditions: ['@ftvm/source'] } };

export default defineConfig({
  resolve,
  ssr,
  test: {
    projects: [
      {
        resolve,
        ssr,
        test: {
          name: 'unit',
          include: ['packages/*/test/**/*.unit.test.ts', 'test/**/*.unit.test.ts'],
          testTimeout: 10_000,
          sequence: { groupOrder: 0 },
        },
      },
      {
        resolve,
        ssr,
        test: {
          name: 'integration',
          include: ['packages/*/test/**/*.int.test.ts', 'test/**/*.int.test.ts'],
          testTimeout: 180_000,
          hookTimeout: 300_000,
          fileParallelism: false,
          maxWorkers: 1,
          // After the unit tests, not beside them (vitest runs projects in parallel by default):
          // clock tests measure QEMU stamps to a fraction of a ms, and a busy CPU moves them by ms.
          sequence: { groupOrder: 1 },
        },
      },
    ],
  },
});
