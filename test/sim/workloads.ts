/**
 * Named workloads for the simulator (FoundationDB style: a workload plus fault generators), each
 * a function from a seed to a full `SimConfig`. The seed also draws the sizes and limits, so
 * thousands of seeds cover small windows, tiny extents, one-request-at-a-time and deep queues.
 *
 * - steady:  no faults at all; the replicas must end byte-identical and every request ok.
 * - network: stream breaks, partitions, delay spikes, checksum errors, duplicate delivery.
 * - crash:   secondary crash, primary crash and power loss, with a light network background.
 * - chaos:   everything at once.
 */
import { Prng } from '../lib/prng.js'
import { mix, type FaultRates, type SimConfig } from './cluster.js'

const KiB = 1024

export const workloadNames = ['steady', 'network', 'crash', 'chaos'] as const
export type WorkloadName = (typeof workloadNames)[number]

const noFaults: FaultRates = {
  disconnect: 0,
  partition: 0,
  spike: 0,
  secondaryCrash: 0,
  primaryCrash: 0,
  powerLoss: 0,
}

export function configFor(workload: WorkloadName, seed: number): SimConfig {
  const p = new Prng(mix(seed, 99))
  const pick = <T>(values: readonly T[]): T => {
    const value = values[p.int(values.length)]
    if (value === undefined) throw new Error('empty choice')
    return value
  }
  const opBytesMax = pick([4 * KiB, 16 * KiB, 32 * KiB])
  const network = workload === 'network' || workload === 'chaos'
  const crashes = workload === 'crash' || workload === 'chaos'
  const faults: FaultRates = { ...noFaults }
  if (network) {
    faults.disconnect = 10 + p.next() * 60
    faults.partition = p.next() * 20
    faults.spike = p.next() * 40
  }
  if (crashes) {
    faults.disconnect = Math.max(faults.disconnect, p.next() * 10)
    faults.secondaryCrash = 2 + p.next() * 6
    faults.primaryCrash = 2 + p.next() * 6
    faults.powerLoss = 1 + p.next() * 5
  }
  return {
    seed,
    workload,
    sizeBytes: pick([64 * KiB, 128 * KiB, 256 * KiB]),
    extentBytes: pick([8 * KiB, 16 * KiB, 32 * KiB]),
    horizonMs: 40 + p.int(160),
    interArrivalMsMean: 0.1 + p.next() * 0.8,
    mix: { read: 25, write: 45, trim: 6, zero: 8, flush: 6 + p.int(12) },
    fuaRate: p.next() * 0.3,
    opBytesMax,
    inflightOpsMax: 1 + p.int(32),
    inflightBytesMax: opBytesMax * (1 + p.int(8)),
    seqWindowMax: 2 + p.int(16),
    peerRetriesMax: p.int(3),
    checksumErrorRate: network ? p.next() * 0.05 : 0,
    duplicateRate: network ? p.next() : 0,
    faults,
    coolEveryMs: 1 + p.next() * 10,
    driftMax: 0.05,
    // The core pins extents loaded at start, so the driver may cool whatever coolable() returns.
    coolLoadedExtents: true,
    stepsMax: 2_000_000,
  }
}
