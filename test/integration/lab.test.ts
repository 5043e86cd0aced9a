/**
 * deploy/lab/lab.sh, as an operator rehearses a failure (root only: network namespaces; CI runs
 * as root): the three-site lab comes up with a volume in sync, a cut between the data sites
 * leaves it degraded while the primary's site keeps taking writes, healing resyncs it (the other
 * site then reads those writes), and `down` leaves no daemon, namespace or state behind. The lab runs
 * cluster TLS, so a CLI without its credentials is refused.
 */
import t from 'tap'
import fs from 'node:fs/promises'
import path from 'node:path'
import { cliPath, missingTools, repoRoot, run, tempDir, until } from '../lib/node-process.js'

const lab = path.join(repoRoot, 'deploy/lab/lab.sh')
const root = process.getuid?.() === 0
const skip = root
  ? await missingTools(['qemu-io', 'ip', 'iptables', 'openssl'])
  : 'needs root (namespaces)'

t.test(
  'the three-site lab: up, cut, heal, down',
  { skip: skip ?? false, timeout: 240_000 },
  async (t) => {
    const dir = path.join(await tempDir('duplex-lab-'), 'state')
    const env = { ...process.env, DUPLEX_LAB_DIR: dir }
    const labRun = (...args: string[]) => run(lab, args, { env, timeoutMs: 120_000 })
    t.teardown(async () => {
      await labRun('down')
      await fs.rm(path.dirname(dir), { recursive: true, force: true })
    })
    const up = await labRun('up')
    t.equal(up.code, 0, `lab.sh up: ${up.stderr}`)
    t.match(
      up.stdout,
      /lab up: a1 10\.77\.0\.1 \(site-a\), b1 10\.77\.0\.2 \(site-b\), witness 10\.77\.0\.3/,
    )
    interface Status {
      volumes: { name: string; inSync?: boolean; owner?: string }[]
    }
    const status = async (): Promise<Status> =>
      JSON.parse((await labRun('cli', 'status', '--output', 'json')).stdout) as Status
    t.match((await status()).volumes, [{ name: 'lab', inSync: true, owner: 'a1' }])
    const anonymous = await labRun(
      ...['exec', 'w', process.execPath, cliPath, 'status', '--witness', '10.77.0.3:10815'],
    )
    t.equal(anonymous.code, 4, 'the lab runs cluster TLS: the CLI without credentials is refused')

    const cut = await labRun('cut', 'a', 'b')
    t.equal(cut.code, 0, cut.stderr)
    const write = await labRun(
      ...['exec', 'a', 'qemu-io', '-f', 'raw', '-c', 'write -P 0x6b 0 4M'],
      'nbd://10.77.0.1:10809/lab',
    )
    t.equal(write.code, 0, `site-a keeps taking writes while cut off from site-b: ${write.stderr}`)
    t.ok(
      await until('the volume degraded', async () =>
        (await status()).volumes[0]?.inSync === false ? true : undefined,
      ),
      'the witness records the volume degraded',
    )

    const healed = await labRun('heal')
    t.equal(healed.code, 0, healed.stderr)
    await until(
      'the volume in sync again',
      async () => ((await status()).volumes[0]?.inSync === true ? true : undefined),
      60_000,
    )
    const read = await labRun(
      ...['exec', 'b', 'qemu-io', '-f', 'raw', '-c', 'read -P 0x6b 0 4M'],
      'nbd://10.77.0.2:10809/lab',
    )
    t.equal(read.code, 0, `site-b reads what site-a wrote alone: ${read.stderr}`)

    const bad = await labRun('cut', 'a', 'x')
    t.equal(bad.code, 2)
    t.match(bad.stderr, /unknown site 'x'/)

    const down = await labRun('down')
    t.equal(down.code, 0, down.stderr)
    const daemons = await run('pgrep', ['-f', `data-dir ${dir}/`])
    t.equal(daemons.stdout.trim(), '', 'no lab daemon outlives down')
    const namespaces = await run('ip', ['netns', 'list'])
    t.notMatch(namespaces.stdout, /dxl-/, 'no lab namespace left')
    await t.rejects(fs.stat(dir), { code: 'ENOENT' }, 'no lab state left')
  },
)
