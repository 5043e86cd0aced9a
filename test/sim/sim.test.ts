/**
 * The deterministic simulation in CI: thousands of seeds across the named workloads (see
 * workloads.ts), each a whole two-replica cluster run with faults and invariant checks
 * (cluster.ts). Prints the first seed; a failure prints the replay command and a trace tail.
 *
 * - DUPLEX_SEED=<n>: run exactly seed n in every workload (the replay of a failure).
 * - DUPLEX_SIM_WORKLOAD=<name>: only that workload.
 * - DUPLEX_SIM_SEEDS=<n>: seeds per workload (default below).
 */
import t from 'tap'
import { testSeed } from '../lib/prng.js'
import { describeFailure, runSeed } from './report.js'
import { workloadNames, type WorkloadName } from './workloads.js'

const seedsPerWorkload: Record<WorkloadName, number> = {
  steady: 700,
  network: 1300,
  crash: 1700,
  chaos: 1300,
}

/** Seeds that once found something, or that cover a rare path; they run every time. */
const regressionSeeds: Record<WorkloadName, number[]> = {
  steady: [1, 2, 3],
  network: [1, 2, 3],
  crash: [1, 2, 3],
  chaos: [1, 2, 3],
}

const replay = process.env['DUPLEX_SEED'] !== undefined
const onlyWorkload = process.env['DUPLEX_SIM_WORKLOAD']
const seedsOverride = process.env['DUPLEX_SIM_SEEDS']
const firstSeed = testSeed()
t.comment(`first seed ${firstSeed} (DUPLEX_SEED=${firstSeed} npx tap dist/test/sim/sim.test.js)`)

const workloads = workloadNames.filter((w) => onlyWorkload === undefined || w === onlyWorkload)

for (const workload of workloads) {
  void t.test(`simulation: ${workload}`, (t) => {
    const count = replay ? 1 : Number(seedsOverride ?? seedsPerWorkload[workload])
    const totals: Record<string, number> = {}
    const started = performance.now()
    let failed = false
    for (let i = 0; i < count && !failed; i++) {
      const seed = (firstSeed + i) >>> 0
      const result = runSeed(workload, seed)
      for (const [name, n] of Object.entries(result.stats)) totals[name] = (totals[name] ?? 0) + n
      if (result.violations.length > 0) {
        failed = true
        t.comment(describeFailure(workload, result))
        t.fail(`${workload} seed ${seed}: ${result.violations.join('; ')}`)
      }
    }
    const ms = Math.round(performance.now() - started)
    t.comment(
      `${workload}: ${count} seeds from ${firstSeed} in ${ms} ms; ${JSON.stringify(totals)}`,
    )
    t.notOk(failed, `${count} seeds hold every invariant`)
    if (!replay && !failed) {
      for (const name of exercised(workload)) {
        t.ok((totals[name] ?? 0) > 0, `${workload} exercised ${name}`)
      }
    }
    t.end()
  })
}

/** A simulator whose faults never fire proves nothing: insist the runs exercised them. */
function exercised(workload: WorkloadName): string[] {
  const want = ['writeOk', 'flushOk', 'readOk', 'alTx', 'cools']
  if (workload === 'steady') want.push('runsIdentical')
  if (workload === 'network' || workload === 'chaos') {
    want.push('fault.disconnect', 'fault.partition', 'fault.spike', 'checksumErrors')
    want.push('net.duplicates', 'net.droppedInFlight')
  }
  if (workload === 'network') want.push('runsIdentical')
  if (workload === 'crash' || workload === 'chaos') {
    want.push('fault.secondaryCrash', 'fault.primaryCrash', 'fault.powerLoss', 'runsWithCrash')
  }
  return want
}

void t.test('simulation: fixed-seed regressions', (t) => {
  for (const workload of workloads) {
    for (const seed of regressionSeeds[workload]) {
      const result = runSeed(workload, seed)
      if (result.violations.length > 0) t.comment(describeFailure(workload, result))
      t.same(result.violations, [], `${workload} seed ${seed}`)
    }
  }
  t.end()
})

void t.test('simulation: a seed replays exactly', (t) => {
  const a = runSeed('chaos', firstSeed)
  const b = runSeed('chaos', firstSeed)
  t.same(b.history, a.history, 'same client history')
  t.same(b.stats, a.stats, 'same counters')
  t.equal(b.endMs, a.endMs, 'same end time')
  t.end()
})
