/**
 * fio's NBD engine against a real `duplex node` at queue depth 32 with crc32c verification of
 * every block written: catches lost, torn and misplaced writes under many requests in flight.
 */
import t from 'tap'
import { missingTools, run, startNode } from '../lib/node-process.js'

const skip = await missingTools(['fio'])

t.test('fio verify at iodepth 32', { skip: skip ?? false }, async (t) => {
  const node = await startNode({ volumes: [{ name: 'vol', size: '256M' }] })
  t.teardown(() => node.stop())
  const common = [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${node.uri('vol')}`,
    '--iodepth=32',
    '--size=256M',
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--verify_state_save=0',
    '--output-format=json',
  ]
  for (const job of [
    ['--rw=randwrite', '--bs=4k', '--number_ios=20000'],
    ['--rw=write', '--bs=1m'],
    ['--rw=randwrite', '--bsrange=512-128k', '--number_ios=4000'],
  ]) {
    const r = await run('fio', [...common, ...job], { timeoutMs: 240_000 })
    t.equal(r.code, 0, `fio ${job.join(' ')}: ${r.stderr}`)
    const result = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))) as {
      jobs: { error: number; read: { io_bytes: number } }[]
    }
    t.equal(result.jobs[0]?.error, 0, 'fio job reports no error')
    t.ok((result.jobs[0]?.read.io_bytes ?? 0) > 0, 'fio read back what it wrote to verify it')
  }
})
