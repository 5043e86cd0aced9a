/**
 * The authorization rules of the three gRPC services under cluster TLS (pure functions of the
 * request and the caller's certificate): who may renew which lease, ask for which grant, change
 * or read the catalog, and call a node.
 */
import t from 'tap'
import { isDuplexError } from '../../src/core/errors.js'
import type { Role } from '../../src/core/tls.js'
import type { Caller } from '../../src/core/unary-rpc.js'
import { peerRules } from '../../src/replica/peer-control.js'
import { adminRules } from '../../src/witness/admin-service.js'
import { witnessRules } from '../../src/witness/witness-service.js'

function as(name: string, role: Role | undefined): Caller {
  return { address: '192.0.2.7:5000', identity: { name, role } }
}
const anonymous: Caller = { address: '192.0.2.8:5000', identity: undefined }

function verdict<Request>(
  rule: (request: Request, caller: Caller) => void,
  request: Request,
  caller: Caller,
): string {
  try {
    rule(request, caller)
    return 'allowed'
  } catch (error) {
    if (!isDuplexError(error, 'PERMISSION_DENIED')) throw error
    return error.message
  }
}

t.test('the witness: a node speaks for itself', async (t) => {
  const a1 = as('a1', 'node')
  t.equal(verdict(witnessRules.heartbeat, { node: 'a1' }, a1), 'allowed')
  t.match(
    verdict(witnessRules.heartbeat, { node: 'b1' }, a1),
    /a1 \(duplex-node\) at 192.0.2.7:5000 may not renew a lease: the request speaks for b1/,
  )
  const takeover = witnessRules.asSender('ask to take over')
  t.equal(verdict(takeover, { node: 'a1' }, a1), 'allowed')
  t.match(verdict(takeover, { node: 'b1' }, a1), /may not ask to take over/)
  t.match(verdict(takeover, { node: 'a1' }, as('a1', 'admin')), /needs a duplex-node/)
  t.match(verdict(takeover, { node: 'a1' }, anonymous), /needs a duplex-node/)
  const handover = { volume: 'v', fromNode: 'a1', toNode: 'b1', epoch: 1 }
  t.equal(verdict(witnessRules.handover, handover, a1), 'allowed', 'the owner hands over')
  t.match(
    verdict(witnessRules.handover, handover, as('b1', 'node')),
    /the request speaks for a1/,
    'the receiver cannot record it',
  )
  t.equal(verdict(witnessRules.status, {}, a1), 'allowed')
  t.equal(verdict(witnessRules.status, {}, as('alice', 'admin')), 'allowed')
  t.match(verdict(witnessRules.status, {}, as('hv', 'client')), /needs a duplex-node or/)
  t.match(verdict(witnessRules.status, {}, as('w', 'witness')), /needs a duplex-node or/)
})

t.test('the catalog: admins change it, a node registers itself, both read', async (t) => {
  const addDomain = { type: 'addDomain', name: 'x', kind: 'data' } as const
  t.equal(verdict(adminRules.change, addDomain, as('alice', 'admin')), 'allowed')
  t.match(
    verdict(adminRules.change, addDomain, as('a1', 'node')),
    /may not change the catalog \(addDomain\): it needs a duplex-admin certificate/,
  )
  t.match(verdict(adminRules.change, addDomain, anonymous), /needs a duplex-admin/)
  const register = {
    type: 'registerNode',
    name: 'a1',
    nbd: '10.0.0.1:10809',
    capacityBytes: 1,
  } as const
  t.equal(verdict(adminRules.change, register, as('a1', 'node')), 'allowed')
  t.match(verdict(adminRules.change, register, as('b1', 'node')), /speaks for a1/)
  t.equal(
    verdict(adminRules.change, register, as('alice', 'admin')),
    'allowed',
    'an admin may register a node too',
  )
  const complete = { type: 'completeMove', name: 'v', fromNode: 'a1', toNode: 'a2' } as const
  t.match(verdict(adminRules.change, complete, as('a1', 'node')), /needs a duplex-admin/)
  t.equal(verdict(adminRules.read, {}, as('a1', 'node')), 'allowed')
  t.equal(verdict(adminRules.read, {}, as('alice', 'admin')), 'allowed')
  t.match(verdict(adminRules.read, {}, as('hv', 'client')), /may not read the catalog/)
})

t.test('a node: other nodes as themselves, admins for the CLI', async (t) => {
  const forward = peerRules.node('forward')
  t.equal(verdict(forward, { fromNode: 'a1' }, as('a1', 'node')), 'allowed')
  t.match(
    verdict(forward, { fromNode: 'a1' }, as('b2', 'node')),
    /b2 \(duplex-node\) .* may not forward: the request speaks for a1/,
  )
  t.match(verdict(forward, { fromNode: 'a1' }, as('alice', 'admin')), /needs a duplex-node/)
  t.equal(verdict(forward, {}, as('a1', 'node')), 'allowed', 'a request naming no sender')
  const describe = peerRules.nodeOrAdmin('describe')
  t.equal(verdict(describe, {}, as('alice', 'admin')), 'allowed')
  t.equal(verdict(describe, {}, as('a1', 'node')), 'allowed')
  t.match(verdict(describe, {}, as('hv', 'client')), /needs a duplex-node or duplex-admin/)
  t.match(verdict(describe, {}, as('w', undefined)), /w \(no duplex role\)/)
})
