/**
 * Running seeds and describing a failing one: the replay command, the violations and the tail of
 * the simulator's trace. Shared by the tap test and the long-run CLI.
 */
import { simulate, type SimResult } from './cluster.js'
import { configFor, type WorkloadName } from './workloads.js'

export function runSeed(workload: WorkloadName, seed: number): SimResult {
  return simulate(configFor(workload, seed))
}

export function replayCommand(workload: WorkloadName, seed: number): string {
  return `DUPLEX_SEED=${seed} npx tap dist/test/sim/sim.test.js  (workload ${workload}; DUPLEX_SIM_WORKLOAD=${workload} runs only it)`
}

export function describeFailure(workload: WorkloadName, result: SimResult, tail = 25): string {
  const { seed } = result.config
  return [
    `workload ${workload}, seed ${seed}: ${result.violations.join('; ')}`,
    `replay: ${replayCommand(workload, seed)}`,
    `   or: node dist/test/sim/run-long.js --workload ${workload} --from ${seed} --seeds 1 --trace`,
    'trace tail:',
    ...result.trace.slice(-tail).map((line) => `  ${line}`),
  ].join('\n')
}
