/**
 * The witness's Admin service against a real witness process: catalog changes survive kill -9,
 * a restarted witness serves the same catalog, and malformed or hostile requests are answered
 * with INVALID_ARGUMENT without changing anything or harming the daemon.
 */
import * as grpc from '@grpc/grpc-js'
import t from 'tap'
import { AdminClient, adminService } from '../../src/witness/admin-service.js'
import { loadProto } from '../../src/core/unary-rpc.js'
import { startWitness } from '../lib/node-process.js'

t.test('catalog changes are durable across kill -9', async (t) => {
  const first = await startWitness()
  const admin = new AdminClient(first.address)
  await admin.change({ type: 'addDomain', name: 'site-a', kind: 'data' })
  await admin.change({ type: 'addDomain', name: 'site-w', kind: 'witness' })
  const answer = await admin.change({
    type: 'addNode',
    name: 'a1',
    domain: 'site-a',
    replication: '127.0.0.1:10811',
    capacityBytes: 2 ** 40,
  })
  t.equal(answer.changed, true)
  t.equal(answer.catalog.revision, 3)
  const again = await admin.change({ type: 'addDomain', name: 'site-a', kind: 'data' })
  t.same([again.changed, again.catalog.revision], [false, 3], 'a repeated change is a no-op')
  admin.close()
  await first.kill()

  const second = await startWitness({ dataDir: first.dataDir })
  t.teardown(() => second.stop())
  const restarted = new AdminClient(second.address)
  t.teardown(() => {
    restarted.close()
  })
  t.same(await restarted.getCatalog(), answer.catalog, 'the same catalog after kill -9')

  // A long poll answers as soon as a newer revision exists.
  const started = Date.now()
  const waiting = restarted.getCatalog(3, 10_000)
  await restarted.change({ type: 'addDomain', name: 'site-b', kind: 'data' })
  const newer = await waiting
  t.equal(newer.revision, 4)
  t.ok(Date.now() - started < 5000, 'the waiting call returned with the change')
  t.equal((await restarted.getCatalog(4, 300)).revision, 4, 'and times out with the same one')
})

t.test('malformed and hostile requests change nothing', async (t) => {
  const witness = await startWitness()
  t.teardown(() => witness.stop())
  const admin = new AdminClient(witness.address)
  t.teardown(() => {
    admin.close()
  })
  const Raw = grpc.makeGenericClientConstructor(adminService, 'Admin')
  const raw = new Raw(witness.address, grpc.credentials.createInsecure())
  t.teardown(() => {
    raw.close()
  })
  const call = (bytes: Uint8Array): Promise<string> =>
    new Promise((resolve, reject) => {
      const fn = (
        raw as unknown as Record<
          string,
          (b: Buffer, cb: (e: Error | null, r: Buffer) => void) => void
        >
      )['Change']
      fn?.call(raw, Buffer.from(bytes), (error, reply) => {
        if (error !== null) reject(error)
        else resolve(reply.toString('latin1'))
      })
    })
  const root = loadProto('duplex/v1/admin.proto')
  const request = root.lookupType('duplex.v1.ChangeRequest')
  const encode = (fields: Record<string, unknown>): Uint8Array =>
    request.encode(request.fromObject(fields)).finish()

  t.match(await call(Buffer.from([0xff, 0xff, 0xff, 0x01])), /malformed Change request/)
  t.match(await call(encode({})), /malformed Change request: no command/)
  t.match(
    await call(encode({ addDomain: { name: 'x'.repeat(1000), kind: 1 } })),
    /INVALID_ARGUMENT.*name longer than 64 bytes/s,
  )
  t.match(
    await call(encode({ addDomain: { name: 'site-a', kind: 9 } })),
    /malformed Change request: kind 9 unknown/,
  )
  t.match(
    await call(
      encode({
        createVolume: {
          name: 'v',
          sizeBytes: '18446744073709551615',
        },
      }),
    ),
    /INVALID_ARGUMENT/,
  )
  t.match(
    await call(encode({ addNode: { name: 'n', domain: 'd', replication: 'y'.repeat(400) } })),
    /replication longer than 300 bytes/,
  )
  t.equal(witness.child.exitCode, null, 'the witness still runs')
  t.same((await admin.getCatalog()).revision, 0, 'and its catalog is unchanged')
})
