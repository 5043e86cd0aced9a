/**
 * Long simulation runs outside CI (no npm needed once built):
 *
 *   node dist/test/sim/run-long.js --seeds 100000 --from 1 [--workload chaos] [--trace]
 *   node dist/test/sim/run-long.js --seeds 100000 --from 1 --workload failover [--trace]
 *
 * Runs `--seeds` consecutive seeds from `--from` in each workload (or only `--workload`), prints
 * progress every few seconds and every failing seed with its replay command; `--trace` prints
 * the trace tail of failures. Exits 1 if any seed failed.
 */
import { failoverConfig, runFailoverSim } from './failover-cluster.js'
import { describeFailure, runSeed } from './report.js'
import { workloadNames, type WorkloadName } from './workloads.js'

function argument(name: string): string | undefined {
  const index = process.argv.indexOf(`--${name}`)
  return index < 0 ? undefined : process.argv[index + 1]
}

const seeds = Number(argument('seeds') ?? 10_000)
const from = Number(argument('from') ?? 1)
const only = argument('workload')
const withTrace = process.argv.includes('--trace')
const failover = only === 'failover'
const workloads = workloadNames.filter((w: WorkloadName) => only === undefined || w === only)
if (
  !Number.isSafeInteger(seeds) ||
  !Number.isSafeInteger(from) ||
  (workloads.length === 0 && !failover)
) {
  console.error(
    'usage: run-long.js --seeds N --from SEED [--workload steady|network|crash|chaos|failover]',
  )
  process.exit(2)
}

let failures = 0
let runs = 0
const started = performance.now()
let lastReport = started
for (let i = 0; i < seeds; i++) {
  const seed = (from + i) >>> 0
  if (failover) {
    const result = runFailoverSim(failoverConfig(seed))
    runs += 1
    if (result.violations.length > 0) {
      failures += 1
      console.log(`failover seed ${seed}: ${result.violations.join('; ')}`)
      console.log(
        `replay: DUPLEX_SEED=${seed} DUPLEX_SIM_SEEDS=1 npx tap dist/test/sim/failover.test.js`,
      )
      if (withTrace) console.log(result.trace.slice(-80).join('\n'))
    }
  }
  for (const workload of failover ? [] : workloads) {
    const result = runSeed(workload, seed)
    runs += 1
    if (result.violations.length > 0) {
      failures += 1
      console.log(
        withTrace ? describeFailure(workload, result) : describeFailure(workload, result, 0),
      )
    }
  }
  const now = performance.now()
  if (now - lastReport > 5000 || i === seeds - 1) {
    lastReport = now
    const rate = Math.round((runs * 1000) / (now - started))
    console.log(`seed ${seed}: ${runs} runs, ${failures} failing, ${rate} runs/s`)
  }
}
process.exitCode = failures > 0 ? 1 : 0
