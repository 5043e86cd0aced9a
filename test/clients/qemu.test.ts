/**
 * qemu-io and qemu-img against a real `duplex node`: pattern writes and reads (with a negative
 * control that must fail), FUA and flush, write-zeroes and discard reading back zeros, and
 * qemu-img convert/compare. `-t none` makes qemu-io send plain writes (its default is
 * writethrough, FUA on every write), so both paths are exercised.
 */
import t from 'tap'
import fs from 'node:fs/promises'
import path from 'node:path'
import { missingTools, run, startNode, tempDir } from '../lib/node-process.js'

const skip = await missingTools(['qemu-io', 'qemu-img'])

function qemuIo(uri: string, commands: string[], cache = 'none'): ReturnType<typeof run> {
  const args = ['-f', 'raw', '-t', cache]
  for (const c of commands) args.push('-c', c)
  args.push(uri)
  return run('qemu-io', args)
}

t.test('qemu-io and qemu-img against duplex node', { skip: skip ?? false }, async (t) => {
  const node = await startNode({ volumes: [{ name: 'vol', size: '64M' }] })
  t.teardown(() => node.stop())
  const uri = node.uri('vol')

  t.test('qemu-img info sees the size', async (t) => {
    const info = await run('qemu-img', ['info', '--output=json', uri])
    t.equal(info.code, 0, info.stderr)
    t.equal(
      (JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size'],
      64 * 1024 * 1024,
    )
  })

  t.test('plain writes read back; a wrong pattern is detected', async (t) => {
    const write = await qemuIo(uri, [
      'write -P 0xa5 0 1M',
      'write -P 0x5a 1M 4k',
      'write -P 0x11 3000 1500',
    ])
    t.equal(write.code, 0, write.stderr)
    const read = await qemuIo(uri, [
      'read -P 0xa5 0 3000',
      'read -P 0x11 3000 1500',
      'read -P 0xa5 4500 1044076',
      'read -P 0x5a 1M 4k',
    ])
    t.equal(read.code, 0, read.stdout + read.stderr)
    t.notMatch(read.stdout, /Pattern verification failed/)
    const negative = await qemuIo(uri, ['read -P 0x5b 1M 4k'])
    t.not(negative.code, 0, 'negative control: the wrong pattern must fail')
    t.match(negative.stdout + negative.stderr, /Pattern verification failed/)
  })

  t.test('writethrough (FUA on every write) and explicit flush', async (t) => {
    const fua = await qemuIo(
      uri,
      ['write -P 0x33 2M 64k', 'write -f -P 0x34 3M 4k', 'flush'],
      'writethrough',
    )
    t.equal(fua.code, 0, fua.stderr)
    const read = await qemuIo(uri, ['read -P 0x33 2M 64k', 'read -P 0x34 3M 4k'])
    t.equal(read.code, 0, read.stdout + read.stderr)
  })

  t.test('write-zeroes and discard read back as zeros', async (t) => {
    const fill = await qemuIo(uri, ['write -P 0x77 4M 4M'])
    t.equal(fill.code, 0, fill.stderr)
    const zero = await qemuIo(uri, [
      'write -z 4M 1M', // may punch a hole
      'write -z -u 5M 1M', // hole allowed (unmap)
      'discard 6M 1M',
      'write -z 7M 1000', // partial block
    ])
    t.equal(zero.code, 0, zero.stderr)
    const read = await qemuIo(uri, [
      'read -P 0 4M 3M',
      'read -P 0 7M 1000',
      `read -P 0x77 ${7 * 1048576 + 1000} ${1048576 - 1000}`,
    ])
    t.equal(read.code, 0, read.stdout + read.stderr)
  })

  t.test('qemu-img convert out and back, then compare', async (t) => {
    const dir = await tempDir()
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    const image = path.join(dir, 'copy.raw')
    const out = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, image])
    t.equal(out.code, 0, out.stderr)
    const same = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, uri])
    t.equal(same.code, 0, same.stdout + same.stderr)
    // Change the image, write it back through NBD, and compare again.
    const edit = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 10M 1M', image])
    t.equal(edit.code, 0, edit.stderr)
    const differs = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, uri])
    t.equal(differs.code, 1, 'compare must notice the difference before the copy back')
    const back = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', image, uri])
    t.equal(back.code, 0, back.stderr)
    const again = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', image, uri])
    t.equal(again.code, 0, again.stdout + again.stderr)
  })
})
