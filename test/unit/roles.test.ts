/**
 * decideRole (src/replica/roles.ts): every rule, and a model check over every pair of records
 * the protocol can leave behind that two nodes deciding independently never both start as
 * primary of one epoch, and a new (empty) replica never leads a volume whose peer holds data.
 */
import t from 'tap'
import { decideRole } from '../../src/replica/roles.js'
import type { PeerView, RoleInput } from '../../src/replica/roles.js'
import type { ReplicaRecord } from '../../src/replica/store.js'

const fresh: ReplicaRecord = { epoch: 0, primary: '', state: 'Inconsistent' }

function input(local: ReplicaRecord, remote: PeerView | undefined, me = 'a'): RoleInput {
  return { me, peer: me === 'a' ? 'b' : 'a', configuredPrimary: 'a', local, remote }
}

function view(record: ReplicaRecord): PeerView {
  return { exists: true, ...record }
}

t.test(
  'a brand-new volume: the configured primary starts epoch 1, the other waits for it',
  async (t) => {
    t.same(decideRole(input(fresh, view(fresh), 'a')), {
      type: 'primary',
      record: { epoch: 1, primary: 'a', state: 'UpToDate' },
    })
    t.same(decideRole(input(fresh, view(fresh), 'b')), {
      type: 'secondary',
      record: fresh,
      expectedPrimary: 'a',
    })
    t.same(
      decideRole(
        input(fresh, { exists: false, epoch: 0, primary: '', state: 'Inconsistent' }, 'a'),
      ),
      { type: 'primary', record: { epoch: 1, primary: 'a', state: 'UpToDate' } },
      'a peer without the volume yet counts as new',
    )
  },
)

t.test('a new replica never starts without hearing from its peer', async (t) => {
  const decision = decideRole(input(fresh, undefined, 'a'))
  t.equal(decision.type, 'wait')
  t.match(decision, { reason: /unreachable/ })
})

t.test('peer unreachable: the local record decides, the primary in a new epoch', async (t) => {
  t.same(decideRole(input({ epoch: 4, primary: 'a', state: 'UpToDate' }, undefined)), {
    type: 'primary',
    record: { epoch: 5, primary: 'a', state: 'UpToDate' },
  })
  t.same(decideRole(input({ epoch: 4, primary: 'b', state: 'UpToDate' }, undefined)), {
    type: 'secondary',
    record: { epoch: 4, primary: 'b', state: 'UpToDate' },
    expectedPrimary: 'b',
  })
})

t.test('the newer record wins: a crash in the middle of a handover is finished', async (t) => {
  // b persisted {5, a} while handing over to a; a crashed before persisting its own record.
  const aLocal: ReplicaRecord = { epoch: 4, primary: 'b', state: 'UpToDate' }
  const bLocal: ReplicaRecord = { epoch: 5, primary: 'a', state: 'UpToDate' }
  t.same(decideRole(input(aLocal, view(bLocal), 'a')), {
    type: 'primary',
    record: { epoch: 6, primary: 'a', state: 'UpToDate' },
  })
  t.same(decideRole(input(bLocal, view(aLocal), 'b')), {
    type: 'secondary',
    record: bLocal,
    expectedPrimary: 'a',
  })
})

t.test('a rebuilt (empty) node named primary asks its peer to take over', async (t) => {
  const peer: ReplicaRecord = { epoch: 7, primary: 'a', state: 'UpToDate' }
  const decision = decideRole(input(fresh, view(peer), 'a'))
  t.equal(decision.type, 'askPeerToTakeOver')
  const neither = decideRole(input(fresh, view({ ...peer, state: 'Inconsistent' }), 'a'))
  t.equal(neither.type, 'wait', 'with no UpToDate replica, nobody starts')
  t.match(neither, { reason: /neither replica is UpToDate/ })
})

t.test('an Inconsistent replica named primary by its own record does not start', async (t) => {
  const decision = decideRole(input({ epoch: 3, primary: 'a', state: 'Inconsistent' }, undefined))
  t.equal(decision.type, 'wait')
})

t.test('a record naming a third node is refused, not followed', async (t) => {
  const decision = decideRole(input({ epoch: 3, primary: 'c', state: 'UpToDate' }, undefined))
  t.equal(decision.type, 'wait')
  t.match(decision, { reason: /neither this node nor its peer/ })
})

t.test('model check: no two primaries of one epoch, no empty leader', async (t) => {
  // Every record a node can hold at epochs 0..3, for both nodes, with the peer reachable or not.
  // (epoch 0 UpToDate: a volume that held data before replication was configured.)
  const records: ReplicaRecord[] = [fresh, { ...fresh, state: 'UpToDate' }]
  for (let epoch = 1; epoch <= 3; epoch++) {
    for (const primary of ['a', 'b']) {
      for (const state of ['UpToDate', 'Inconsistent'] as const) {
        records.push({ epoch, primary, state })
      }
    }
  }
  let pairs = 0
  for (const ra of records) {
    for (const rb of records) {
      // The protocol keeps both nodes' records consistent: in one epoch they name the same
      // primary (both persist it before using it).
      if (ra.epoch === rb.epoch && ra.epoch > 0 && ra.primary !== rb.primary) continue
      pairs += 1
      const da = decideRole(input(ra, view(rb), 'a'))
      const db = decideRole(input(rb, view(ra), 'b'))
      if (da.type === 'primary' && db.type === 'primary') {
        t.not(
          da.record.epoch,
          db.record.epoch,
          `two primaries in one epoch from ${JSON.stringify([ra, rb])}`,
        )
      }
      for (const [decision, local, other] of [
        [da, ra, rb],
        [db, rb, ra],
      ] as const) {
        if (decision.type !== 'primary') continue
        // Both new: no replicated write exists anywhere yet, so the configured primary leads.
        const brandNew = local.epoch === 0 && other.epoch === 0
        if (!brandNew) {
          t.equal(
            local.state,
            'UpToDate',
            `only an UpToDate replica leads: ${JSON.stringify([local, other])}`,
          )
        }
        t.ok(
          decision.record.epoch > Math.max(local.epoch, other.epoch) ||
            (local.epoch === 0 && other.epoch === 0),
          'a primary starts in an epoch newer than both records',
        )
        // A node whose peer names the peer itself primary in a newer epoch never leads.
        if (other.epoch > local.epoch) t.not(other.primary, '', 'the newer record names someone')
      }
      // A new replica never leads a volume the peer holds data of.
      if (ra.epoch === 0 && rb.epoch > 0) t.not(da.type, 'primary', JSON.stringify([ra, rb]))
    }
  }
  t.ok(pairs > 100, `checked ${pairs} record pairs`)
})
