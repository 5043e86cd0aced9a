import t from 'tap'
import { checkDaemonConfig } from '../../src/cli/daemon-config.js'

const options = { 'data-dir': 'string', listen: 'string', 'lease-ms': 'number' } as const

t.test('a config file holds the options of its command', async (t) => {
  t.same(checkDaemonConfig({ 'data-dir': '/d', 'lease-ms': 3000 }, 'w.json', options), {
    'data-dir': '/d',
    'lease-ms': 3000,
  })
})

t.test('typos, wrong types and other shapes are errors that name the file and key', async (t) => {
  const cases: [unknown, RegExp][] = [
    [
      { 'data-dri': '/d' },
      /^w\.json: unknown option "data-dri"; this command takes: data-dir, listen, lease-ms$/,
    ],
    [{ 'lease-ms': '3000' }, /^w\.json: "lease-ms" must be a number, not "3000"$/],
    [{ listen: 10809 }, /"listen" must be a string, not 10809/],
    [{ 'lease-ms': null }, /must be a number, not null/],
    [[], /expected a JSON object of options/],
    ['x', /expected a JSON object of options/],
  ]
  for (const [json, message] of cases) {
    t.throws(() => checkDaemonConfig(json, 'w.json', options), {
      code: 'INVALID_ARGUMENT',
      message,
    })
  }
})
