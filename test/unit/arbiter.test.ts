/**
 * The witness's arbitration (src/witness/arbiter.ts), rule by rule, plus the epoch and lease
 * arithmetic it relies on. The drifting-clock model check lives in test/sim/witness.test.ts.
 */
import t from 'tap'
import type { Test } from 'tap'
import {
  formatEpoch,
  generationOf,
  nextGeneration,
  nextTerm,
  termsPerGeneration,
} from '../../src/core/epochs.js'
import { Arbiter } from '../../src/witness/arbiter.js'
import type { Decision, VolumeRecord } from '../../src/witness/arbiter.js'
import {
  grantorLeaseEnd,
  holderLeaseEnd,
  leaseTimingProblem,
  nodeLeaseDefaults,
} from '../../src/witness/lease.js'

const timing = nodeLeaseDefaults
const G = termsPerGeneration
/** After the restart quiet period of an arbiter started at 0. */
const awake = grantorLeaseEnd(0, timing) + 1

function inSync(epoch = G + 3, owner = 'a'): VolumeRecord {
  return { volume: 'v', replicas: ['a', 'b'], epoch, owner, inSync: true }
}

function arbiter(...records: VolumeRecord[]): Arbiter {
  return new Arbiter(timing, records, 0)
}

/** The record of a granted decision (fails the test otherwise). */
function grant(t: Test, decision: Decision): VolumeRecord {
  if (!decision.ok) {
    t.fail(`refused: ${decision.code} ${decision.message}`)
    throw new Error('refused')
  }
  return decision.record
}

function refused(t: Test, decision: Decision, code: string, pattern: RegExp): void {
  t.equal(decision.ok, false, 'refused')
  if (!decision.ok) {
    t.equal(decision.code, code)
    t.match(decision.message, pattern)
  }
}

t.test('epochs: terms stay within a generation, generations order first', async (t) => {
  t.equal(generationOf(3 * G + 7), 3)
  t.equal(nextTerm(3 * G + 7), 3 * G + 8)
  t.equal(nextGeneration(3 * G + 7), 4 * G)
  t.equal(nextGeneration(0), G)
  t.equal(formatEpoch(3 * G + 7), '3.7')
  t.ok(nextGeneration(5) > nextTerm(G - 2), 'any next generation beats any term before it')
  t.throws(() => nextTerm(G - 1), /no term left/)
})

t.test('leases: the holder stops relying on a lease before the grantor lets it go', async (t) => {
  t.equal(holderLeaseEnd(1000, timing), 1000 + 3000 * 0.99)
  t.equal(grantorLeaseEnd(1000, timing), 1000 + 3000 * 1.01 + 250)
  t.equal(leaseTimingProblem(timing), undefined)
  t.match(leaseTimingProblem({ ...timing, leaseMs: 10 }), /outside 100 ms/)
  t.match(leaseTimingProblem({ ...timing, driftRatio: 0.7 }), /drift ratio/)
  t.match(leaseTimingProblem({ ...timing, marginMs: -1 }), /margin/)
  t.match(leaseTimingProblem({ ...timing, leaseMs: Number.NaN }), /outside/)
})

t.test('a restarted witness grants nothing for one lease period', async (t) => {
  const witness = arbiter(inSync())
  refused(
    t,
    witness.degrade({ volume: 'v', node: 'a', epoch: G + 3 }, 10),
    'UNAVAILABLE',
    /restarted/,
  )
  refused(
    t,
    witness.takeover({ volume: 'v', node: 'b', epoch: G + 3 }, 10),
    'UNAVAILABLE',
    /\d+ ms/,
  )
  t.ok(witness.leaseMayBeValid('a', 10), 'every node may hold a lease from before')
  t.ok(witness.leaseMayBeValid('never-seen', 10))
  t.notOk(witness.leaseMayBeValid('never-seen', awake))
  grant(t, witness.degrade({ volume: 'v', node: 'a', epoch: G + 3 }, awake))
})

t.test('degrade: only the owner, in its generation, gets a new one as sole owner', async (t) => {
  const witness = arbiter(inSync())
  refused(
    t,
    witness.degrade({ volume: 'v', node: 'b', epoch: G + 3 }, awake),
    'FAILED_PRECONDITION',
    /a owns it in epoch 1\.3/,
  )
  refused(
    t,
    witness.degrade({ volume: 'nope', node: 'a', epoch: 1 }, awake),
    'VOLUME_NOT_FOUND',
    /nope/,
  )
  const decision = witness.degrade({ volume: 'v', node: 'a', epoch: G + 5 }, awake)
  t.same(grant(t, decision), { ...inSync(), epoch: 2 * G, inSync: false })
  t.ok(decision.ok && decision.change !== undefined, 'a change to make durable')
  t.same(witness.record('v'), inSync(), 'nothing changes before apply')
  if (decision.ok && decision.change !== undefined) witness.apply(decision.change)
  const again = witness.degrade({ volume: 'v', node: 'a', epoch: G + 5 }, awake)
  t.same(
    grant(t, again),
    { ...inSync(), epoch: 2 * G, inSync: false },
    'a retry gets the same grant',
  )
  t.equal(again.ok && again.change, undefined, 'and changes nothing')
})

t.test('degrade: an owner that missed a generation must catch up first', async (t) => {
  const witness = arbiter(inSync(3 * G))
  refused(
    t,
    witness.degrade({ volume: 'v', node: 'a', epoch: 2 * G + 9 }, awake),
    'FAILED_PRECONDITION',
    /catch up/,
  )
})

t.test(
  'takeover: only once the owner lease expired, and only from an in-sync replica',
  async (t) => {
    const witness = arbiter(inSync())
    witness.heartbeat('a', awake)
    refused(
      t,
      witness.takeover({ volume: 'v', node: 'b', epoch: G + 3 }, awake + 1000),
      'UNAVAILABLE',
      /a still holds its lease/,
    )
    const expired = grantorLeaseEnd(awake, timing)
    refused(
      t,
      witness.takeover({ volume: 'v', node: 'b', epoch: G + 3 }, expired - 1),
      'UNAVAILABLE',
      /lease/,
    )
    refused(
      t,
      witness.takeover({ volume: 'v', node: 'b', epoch: 2 }, expired),
      'FAILED_PRECONDITION',
      /catch up/,
    )
    refused(
      t,
      witness.takeover({ volume: 'v', node: 'c', epoch: G + 3 }, expired),
      'INVALID_ARGUMENT',
      /c holds no replica/,
    )
    refused(
      t,
      witness.takeover({ volume: 'v', node: 'a', epoch: G + 3 }, expired),
      'FAILED_PRECONDITION',
      /primary of v already/,
    )
    const decision = witness.takeover({ volume: 'v', node: 'b', epoch: G + 4 }, expired)
    t.same(grant(t, decision), { ...inSync(), epoch: 2 * G, owner: 'b', inSync: false })
    if (decision.ok && decision.change !== undefined) witness.apply(decision.change)
    refused(
      t,
      witness.degrade({ volume: 'v', node: 'a', epoch: G + 4 }, expired),
      'FAILED_PRECONDITION',
      /b owns it/,
    )
    refused(
      t,
      witness.takeover({ volume: 'v', node: 'a', epoch: 2 * G }, expired + 1e6),
      'FAILED_PRECONDITION',
      /run it alone/,
    )
  },
)

t.test('a cut link: the live owner degrades, then the takeover is refused', async (t) => {
  const witness = arbiter(inSync())
  const now = awake + 10_000
  witness.heartbeat('a', now)
  witness.heartbeat('b', now)
  const decision = witness.degrade({ volume: 'v', node: 'a', epoch: G + 3 }, now)
  if (decision.ok && decision.change !== undefined) witness.apply(decision.change)
  refused(
    t,
    witness.takeover({ volume: 'v', node: 'b', epoch: G + 3 }, now + 1e6),
    'FAILED_PRECONDITION',
    /alone/,
  )
})

t.test(
  'handover: the in-sync owner hands over in a new generation; retries are answered',
  async (t) => {
    const witness = arbiter(inSync())
    refused(
      t,
      witness.handover({ volume: 'v', fromNode: 'b', toNode: 'a', epoch: G + 3 }, awake),
      'FAILED_PRECONDITION',
      /a owns it/,
    )
    refused(
      t,
      witness.handover({ volume: 'v', fromNode: 'a', toNode: 'a', epoch: G + 3 }, awake),
      'INVALID_ARGUMENT',
      /itself/,
    )
    const decision = witness.handover(
      { volume: 'v', fromNode: 'a', toNode: 'b', epoch: G + 3 },
      awake,
    )
    t.same(grant(t, decision), { ...inSync(), epoch: 2 * G, owner: 'b' })
    if (decision.ok && decision.change !== undefined) witness.apply(decision.change)
    const retry = witness.handover({ volume: 'v', fromNode: 'a', toNode: 'b', epoch: G + 3 }, awake)
    t.same(grant(t, retry), { ...inSync(), epoch: 2 * G, owner: 'b' })
    const degraded = arbiter({ ...inSync(), inSync: false })
    refused(
      t,
      degraded.handover({ volume: 'v', fromNode: 'a', toNode: 'b', epoch: G + 3 }, awake),
      'FAILED_PRECONDITION',
      /resync/,
    )
  },
)

t.test(
  'report: first report creates, the owner advances terms and sync, others learn',
  async (t) => {
    const witness = arbiter()
    const report = {
      volume: 'v',
      node: 'b',
      replicas: ['b', 'a'] as const,
      epoch: G,
      primary: 'a',
      inSync: false,
    }
    const created = witness.report(report)
    t.same(grant(t, created), {
      volume: 'v',
      replicas: ['a', 'b'],
      epoch: G,
      owner: 'a',
      inSync: false,
    })
    if (created.ok && created.change !== undefined) witness.apply(created.change)
    const byOther = witness.report({ ...report, epoch: G + 1, inSync: true })
    t.equal(byOther.ok && byOther.change, undefined, 'the non-owner changes nothing')
    const byOwner = witness.report({ ...report, node: 'a', epoch: G + 1, inSync: true })
    t.same(grant(t, byOwner), {
      volume: 'v',
      replicas: ['a', 'b'],
      epoch: G + 1,
      owner: 'a',
      inSync: true,
    })
    if (byOwner.ok && byOwner.change !== undefined) witness.apply(byOwner.change)
    const older = witness.report({ ...report, node: 'a', epoch: G, inSync: false })
    t.equal(older.ok && older.change, undefined, 'an older term changes nothing')
    const newer = witness.report({
      ...report,
      node: 'b',
      epoch: 5 * G,
      primary: 'b',
      inSync: false,
    })
    t.same(
      grant(t, newer),
      { volume: 'v', replicas: ['a', 'b'], epoch: 5 * G, owner: 'b', inSync: false },
      'a newer generation is adopted',
    )
    refused(
      t,
      witness.report({ ...report, node: 'a', replicas: ['a', 'c'] }),
      'INVALID_ARGUMENT',
      /replicas on a and b/,
    )
    refused(
      t,
      witness.report({ ...report, replicas: ['a', 'a'] }),
      'INVALID_ARGUMENT',
      /two different nodes/,
    )
    refused(
      t,
      witness.report({ ...report, primary: 'c' }),
      'INVALID_ARGUMENT',
      /two different nodes/,
    )
  },
)

t.test('heartbeats: leases are tracked per node, and bounded', async (t) => {
  const witness = arbiter()
  t.ok(witness.heartbeat('a', awake))
  t.same(witness.leases(awake + 1000), [
    { node: 'a', renewedAt: awake, remainingMs: grantorLeaseEnd(awake, timing) - awake - 1000 },
  ])
  for (let i = 0; i < 5000; i++) witness.heartbeat(`n${i}`, awake)
  t.equal(witness.leases(awake).length, 4096, 'no more than leaseNodesMax')
  t.ok(witness.heartbeat('a', awake), 'a known node still renews')
})

t.test('degrade: an owner not yet in sync still gets a new generation', async (t) => {
  // The owner's first report said "not in sync" (its peer was syncing); a report of "in sync"
  // for that epoch may still be in flight. The grant must move past it.
  const witness = arbiter({ ...inSync(), inSync: false })
  const decision = witness.degrade({ volume: 'v', node: 'a', epoch: G + 3 }, awake)
  const granted = grant(t, decision)
  t.equal(granted.epoch, 2 * G, 'a new generation')
  if (decision.ok && decision.change !== undefined) witness.apply(decision.change)
  const late = witness.report({
    volume: 'v',
    node: 'a',
    replicas: ['a', 'b'],
    epoch: G + 3,
    primary: 'a',
    inSync: true,
  })
  t.same(grant(t, late), { ...inSync(), epoch: 2 * G, inSync: false }, 'the late report is ignored')
})

t.test('requests from a generation the witness does not know are refused', async (t) => {
  // An admin forced a promotion while the witness was away: it cannot judge that lineage
  // until its primary reports it.
  const witness = arbiter({ ...inSync(), inSync: false })
  refused(
    t,
    witness.takeover({ volume: 'v', node: 'a', epoch: 3 * G + 1 }, awake),
    'FAILED_PRECONDITION',
    /must report that epoch first/,
  )
  refused(
    t,
    witness.degrade({ volume: 'v', node: 'b', epoch: 3 * G }, awake),
    'FAILED_PRECONDITION',
    /must report that epoch first/,
  )
  const reported = witness.report({
    volume: 'v',
    node: 'b',
    replicas: ['a', 'b'],
    epoch: 3 * G,
    primary: 'b',
    inSync: false,
  })
  t.same(grant(t, reported), { ...inSync(3 * G, 'b'), inSync: false }, 'a report is adopted')
})

t.test('replace: the owner of an in-sync pair records a moved replica, same epoch', async (t) => {
  const epoch = G + 3
  const witness = arbiter(inSync(epoch))
  const request = { volume: 'v', node: 'a', epoch, fromNode: 'b', toNode: 'c' }
  const moved = grant(t, witness.replace(request, awake))
  t.same(moved, { volume: 'v', replicas: ['a', 'c'], epoch, owner: 'a', inSync: true })
  witness.apply(moved)
  const again = witness.replace(request, awake)
  t.ok(again.ok && again.change === undefined, 'a retry gets the record back, unchanged')
  // The replica that left can ask for nothing any more.
  refused(
    t,
    witness.takeover({ volume: 'v', node: 'b', epoch }, awake + 10 * timing.leaseMs),
    'INVALID_ARGUMENT',
    /b holds no replica of v \(a and c do\)/,
  )
  refused(
    t,
    witness.report({
      volume: 'v',
      node: 'b',
      replicas: ['a', 'b'],
      epoch,
      primary: 'a',
      inSync: true,
    }),
    'INVALID_ARGUMENT',
    /v has replicas on a and c at the witness, not a and b/,
  )
  // The new replica may take over once the owner is gone: it holds every write.
  const taken = grant(
    t,
    witness.takeover({ volume: 'v', node: 'c', epoch }, awake + 10 * timing.leaseMs),
  )
  t.equal(taken.owner, 'c')
})

t.test('replace: refused unless the owner asks, in its epoch, with the pair in sync', async (t) => {
  const epoch = G + 3
  const base = { volume: 'v', epoch, fromNode: 'b', toNode: 'c' }
  refused(
    t,
    arbiter(inSync(epoch)).replace({ ...base, node: 'b', fromNode: 'a' }, awake),
    'FAILED_PRECONDITION',
    /b cannot move v's replica in epoch 1\.3: a owns it/,
  )
  refused(
    t,
    arbiter(inSync(epoch)).replace({ ...base, node: 'a', epoch: epoch - 1 }, awake),
    'FAILED_PRECONDITION',
    /a owns it in epoch 1\.3/,
  )
  refused(
    t,
    arbiter({ ...inSync(epoch), inSync: false }).replace({ ...base, node: 'a' }, awake),
    'FAILED_PRECONDITION',
    /v is not in sync \(a runs it alone\); a replica moves only from a synced pair/,
  )
  refused(
    t,
    arbiter(inSync(epoch)).replace({ ...base, node: 'a', fromNode: 'x' }, awake),
    'INVALID_ARGUMENT',
    /x holds no replica of v/,
  )
  refused(
    t,
    arbiter(inSync(epoch)).replace({ ...base, node: 'a', toNode: 'a' }, awake),
    'INVALID_ARGUMENT',
    /three different nodes/,
  )
  refused(
    t,
    arbiter(inSync(epoch)).replace({ ...base, node: 'a', toNode: 'b' }, awake),
    'INVALID_ARGUMENT',
    /three different nodes/,
  )
  refused(
    t,
    arbiter(inSync(epoch)).replace({ ...base, node: 'a' }, 0),
    'UNAVAILABLE',
    /the witness restarted/,
  )
})
