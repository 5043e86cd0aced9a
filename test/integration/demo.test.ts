/**
 * `npm start` runs `duplex demo`: it must print its process lines (the output contract users and
 * scripts rely on), serve the demo volume to a real client, stop cleanly on SIGTERM and on
 * SIGINT, and reuse its state on the next run. It runs cluster TLS with credentials it made itself,
 * which the CLI uses through DUPLEX_CREDENTIALS.
 */
import t from 'tap'
import fs from 'node:fs/promises'
import path from 'node:path'
import { startDemo } from '../lib/demo-process.js'
import { cliPath, freePorts, missingTools, run, tempDir } from '../lib/node-process.js'

const skip = await missingTools(['qemu-io'])

t.test(
  'duplex demo serves, stops cleanly, and keeps its data',
  { skip: skip ?? false },
  async (t) => {
    const dir = await tempDir('duplex-demo-')
    t.teardown(() => fs.rm(dir, { recursive: true, force: true }))
    const port = await freePorts(8)

    let demo = await startDemo(dir, port)
    t.match(
      demo.firstLine,
      new RegExp(
        `^node-a pid \\d+ nbd://127\\.0\\.0\\.1:${port}/demo metrics http://127\\.0\\.0\\.1:${port + 1}/metrics$`,
      ),
      'the process line names the node, its pid, its NBD URI and its metrics URL',
    )
    t.match(
      demo.secondLine,
      new RegExp(
        `^node-b pid \\d+ nbd://127\\.0\\.0\\.1:${port + 3}/demo metrics http://127\\.0\\.0\\.1:${port + 4}/metrics$`,
      ),
      'and one line for the second node',
    )
    t.match(
      demo.witnessLine,
      new RegExp(
        `^witness pid \\d+ witness 127\\.0\\.0\\.1:${port + 6} metrics http://127\\.0\\.0\\.1:${port + 7}/metrics$`,
      ),
      'and one for the witness',
    )
    const uri = `nbd://127.0.0.1:${port}/demo`
    const uriB = `nbd://127.0.0.1:${port + 3}/demo`
    const info = await run('qemu-img', ['info', '--output=json', uri])
    t.equal((JSON.parse(info.stdout) as { 'virtual-size': number })['virtual-size'], 1024 ** 3)
    const write = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5d 0 1M', uri])
    t.equal(write.code, 0, write.stderr)
    const other = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5d 0 1M', uriB])
    t.equal(other.code, 0, `a write through node-a reads back through node-b: ${other.stderr}`)

    // The cluster runs mutual TLS with the demo's throwaway credentials.
    const witness = `127.0.0.1:${port + 6}`
    const status = (env: NodeJS.ProcessEnv) =>
      run(process.execPath, [cliPath, 'status', '--witness', witness], { env })
    const plain = { ...process.env }
    delete plain.DUPLEX_CREDENTIALS
    const admin = await status({
      ...plain,
      DUPLEX_CREDENTIALS: path.join(dir, 'credentials/admin'),
    })
    t.equal(admin.code, 0, `the CLI with the demo's admin credentials: ${admin.stderr}`)
    t.match(admin.stdout, /demo/)
    const anonymous = await status(plain)
    t.equal(anonymous.code, 4, 'the CLI without credentials cannot reach the witness')
    t.match(anonymous.stderr, /needs --credentials DIR/)

    t.equal(await demo.stop('SIGTERM'), 0, 'SIGTERM stops the demo cleanly')
    const refused = await run('qemu-img', ['info', uri])
    t.not(refused.code, 0, 'nothing listens after the demo stopped')

    demo = await startDemo(dir, port)
    const read = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5d 0 1M', uri])
    t.equal(read.code, 0, `data kept across runs: ${read.stdout}${read.stderr}`)
    const readB = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5d 0 1M', uriB])
    t.equal(readB.code, 0, `on both nodes: ${readB.stdout}${readB.stderr}`)
    t.equal(await demo.stop('SIGINT'), 0, 'Ctrl-C (SIGINT) stops the demo cleanly')
  },
)
