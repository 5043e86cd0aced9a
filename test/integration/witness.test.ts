/**
 * `duplex witness` as a real process: grants follow the arbitration rules over gRPC, every
 * grant survives kill -9, a restarted witness grants nothing for one lease period, bad input
 * gets a clear error without hurting the daemon, one witness per data directory, and /metrics
 * counts what happened.
 */
import * as grpc from '@grpc/grpc-js'
import t from 'tap'
import { isDuplexError } from '../../src/core/errors.js'
import { termsPerGeneration } from '../../src/core/epochs.js'
import { WitnessClient, witnessService } from '../../src/witness/witness-service.js'
import { rejection, spawnDaemon, startWitness } from '../lib/node-process.js'

const G = termsPerGeneration
/** A short lease keeps the test fast: the restart pause is ~0.76 s. */
const leaseArgs = ['--lease-ms', '500']

async function untilGranting(client: WitnessClient): Promise<void> {
  for (;;) {
    const status = await client.status()
    if (status.quietMs === 0) return
    await new Promise((resolve) => setTimeout(resolve, status.quietMs + 10))
  }
}

t.test('grants over gRPC, durable across kill -9, paused after a restart', async (t) => {
  const witness = await startWitness({ extraArgs: leaseArgs })
  t.teardown(() => witness.kill())
  const client = new WitnessClient(witness.address)
  t.teardown(() => {
    client.close()
  })

  const report = {
    volume: 'vol',
    node: 'node-a',
    replicas: ['node-a', 'node-b'] as const,
    epoch: G + 2,
    primary: 'node-a',
    inSync: true,
  }
  t.same(await client.report(report), {
    volume: 'vol',
    replicas: ['node-a', 'node-b'],
    epoch: G + 2,
    owner: 'node-a',
    inSync: true,
  })
  const paused = await rejection(client.degrade({ volume: 'vol', node: 'node-a', epoch: G + 2 }))
  t.ok(isDuplexError(paused, 'UNAVAILABLE'), 'a fresh witness pauses its grants')
  t.match(String(paused), /grants nothing for another \d+ ms/)
  await untilGranting(client)

  // node-a alive: node-b's takeover is refused; once node-a's lease lapses it is granted.
  const heartbeat = await client.heartbeat('node-a')
  t.equal(heartbeat.timing.leaseMs, 500)
  t.same(
    heartbeat.volumes.map((v) => v.volume),
    ['vol'],
  )
  const refused = await rejection(client.takeover({ volume: 'vol', node: 'node-b', epoch: G + 2 }))
  t.ok(isDuplexError(refused, 'UNAVAILABLE'), 'not yet: node-a may be alive')
  t.match(String(refused), /node-a still holds its lease/)
  await new Promise((resolve) => setTimeout(resolve, 900))
  const grant = await client.takeover({ volume: 'vol', node: 'node-b', epoch: G + 2 })
  t.same(grant, {
    volume: 'vol',
    replicas: ['node-a', 'node-b'],
    epoch: 2 * G,
    owner: 'node-b',
    inSync: false,
  })
  const late = await rejection(client.degrade({ volume: 'vol', node: 'node-a', epoch: G + 2 }))
  t.match(String(late), /node-b owns it in epoch 2\.0/)

  const metrics = await fetch(`http://127.0.0.1:${witness.metricsPort ?? 0}/metrics`).then((r) =>
    r.text(),
  )
  t.match(metrics, /duplex_witness_grants_total\{kind="takeover",witness="witness"\} 1/)
  t.match(
    metrics,
    /duplex_witness_refusals_total\{kind="takeover",code="UNAVAILABLE",witness="witness"\} 1/,
  )
  t.match(metrics, /duplex_witness_volumes\{state="degraded",witness="witness"\} 1/)

  // kill -9 right after the grant was answered: it is on disk, and the restart pauses grants.
  await witness.kill()
  const again = await startWitness({
    dataDir: witness.dataDir,
    listen: witness.address,
    extraArgs: leaseArgs,
  })
  t.teardown(() => again.kill())
  const status = await client.status()
  t.same(status.volumes, [grant], 'the grant survived kill -9')
  t.ok(status.quietMs > 0, 'grants are paused after the restart')
  const pausedAgain = await rejection(
    client.degrade({ volume: 'vol', node: 'node-b', epoch: 2 * G }),
  )
  t.ok(isDuplexError(pausedAgain, 'UNAVAILABLE'))
  await untilGranting(client)
  // A retry carries the epoch the node knew when it first asked (it never heard the answer).
  t.same(
    await client.takeover({ volume: 'vol', node: 'node-b', epoch: G + 2 }),
    grant,
    'a retried grant is answered again',
  )
  t.equal(await again.stop(), 0, 'SIGTERM stops it cleanly')
})

t.test('bad input gets a clear error and the witness keeps serving', async (t) => {
  const witness = await startWitness({ extraArgs: leaseArgs })
  t.teardown(() => witness.kill())
  const client = new WitnessClient(witness.address)
  t.teardown(() => {
    client.close()
  })
  const same = await rejection(
    client.report({
      volume: 'v',
      node: 'n',
      replicas: ['n', 'n'],
      epoch: 1,
      primary: 'n',
      inSync: true,
    }),
  )
  t.match(String(same), /both replicas on n/, 'checked before sending')

  // A hostile client sends garbage and a report the codec refuses.
  const Raw = grpc.makeGenericClientConstructor(witnessService, 'Witness')
  const raw = new Raw(witness.address, grpc.credentials.createInsecure())
  t.teardown(() => {
    raw.close()
  })
  const call = (method: string, bytes: Buffer): Promise<Buffer> =>
    new Promise((resolve, reject) => {
      const fn = (
        raw as unknown as Record<
          string,
          (b: Buffer, cb: (e: Error | null, r: Buffer) => void) => void
        >
      )[method]
      fn?.call(raw, bytes, (error, reply) => {
        if (error !== null) reject(error)
        else resolve(reply)
      })
    })
  const garbage = await call('Takeover', Buffer.from([0xff, 0xff, 0xff, 0x01]))
  t.match(garbage.toString('latin1'), /INVALID_ARGUMENT/)
  t.match(garbage.toString('latin1'), /malformed Takeover request/)
  t.equal(witness.child.exitCode, null, 'still running')
  t.same((await client.status()).volumes, [], 'nothing recorded')

  const second = await rejection(
    spawnDaemon('duplex witness', [
      'witness',
      '--data-dir',
      witness.dataDir,
      '--listen',
      '127.0.0.1:0',
    ]),
  )
  t.match(String(second), /in use by another process \(is a duplex witness already running\?\)/)

  const badLease = await rejection(
    spawnDaemon('duplex witness', ['witness', '--data-dir', witness.dataDir, '--lease-ms', '5']),
  )
  t.match(String(badLease), /--lease-ms: lease 5 ms is outside/)
})
