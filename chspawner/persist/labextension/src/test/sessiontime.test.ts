// Unit tests of sessiontime.ts: the session status's words, warnings, asks.
import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import {
  IKernelJobStatus,
  ISessionStatus,
  Warnings,
  clock,
  duration,
  kernelWarning,
  pollDelayMs,
  roundedDuration,
  secondsLeft,
  serverWarning,
  statusText,
  statusTitle,
  waitingNotice
} from '../sessiontime';

// 2026-03-02 13:00 on the machine's clock (local time, as the page's).
const NOW = new Date(2026, 2, 2, 13, 0, 0).getTime() / 1000;

function status(extra: Partial<ISessionStatus> = {}): ISessionStatus {
  return {
    now: NOW,
    warn_minutes: [15, 5],
    server: {
      job_id: '1234', node: 'n1', state: 'running', end_time: NOW + 3900,
      time_left: '1 h 05 min left (until 14:05)',
      at_end: 'your server stops then: save your work'
    },
    kernels: [],
    ...extra
  };
}

const WAITING: IKernelJobStatus = {
  kernel_id: 'k1', job_id: '1240', state: 'pending', end_time: null, time_left: null,
  waiting: 'job 1240 waits: the nodes it needs are busy with other jobs (Resources); ' +
    'place 2 of 3 in the queue',
  waiting_brief: 'job 1240 waits: the nodes it needs are busy with other jobs; ' +
    'place 2 of 3 in the queue',
  at_end: 'the kernel restarts in a new job then: its variables are lost'
};

const RUNNING: IKernelJobStatus = {
  ...WAITING, kernel_id: 'k2', job_id: '1241', state: 'running', node: 'n2',
  end_time: NOW + 280, waiting: null
};

test('durations read as the server writes them', () => {
  assert.equal(duration(3900), '1 h 05 min');
  assert.equal(duration(14 * 60 + 59), '14 min');
  assert.equal(duration(40.7), '40 s');
  assert.equal(duration(-5), '0 s');
  // A warning's minutes, to the nearest: the 15-minute one says 15.
  assert.equal(roundedDuration(899.4), '15 min');
  assert.equal(roundedDuration(59), '59 s');
  assert.equal(roundedDuration(3599), '1 h 00 min');
});

test('a clock time, with its day when not today', () => {
  assert.equal(clock(NOW + 3900, NOW), '14:05');
  assert.equal(clock(NOW + 86400, NOW), 'Tue 03 Mar 13:00');
});

test('the status bar counts down between asks', () => {
  const s = status({ kernels: [WAITING, RUNNING] });
  assert.equal(statusText(s, NOW),
    'Job 1234: 1 h 05 min left · Kernel job 1240 waits: the nodes it needs are busy with ' +
    'other jobs; place 2 of 3 in the queue · Kernel job 1241: 4 min left');
  assert.equal(statusText(s, NOW + 3900 - 30).split(' · ')[0], 'Job 1234: 30 s left');
  assert.equal(secondsLeft(WAITING, NOW), null); // (no limit runs while it waits)
  // Outside a job, nothing to say.
  assert.equal(statusText(status({ server: null }), NOW), '');
});

test('its title says everything, in words', () => {
  const title = statusTitle(status({ kernels: [WAITING, RUNNING] }), NOW, { k1: 'a.ipynb' });
  assert.deepEqual(title.split('\n'), [
    'Your server: Slurm job 1234 on node n1: 1 h 05 min left (until 14:05): your server ' +
      'stops then: save your work.',
    'The kernel of a.ipynb: job 1240 waits: the nodes it needs are busy with other jobs ' +
      '(Resources); place 2 of 3 in the queue.',
    'Your kernel: Slurm job 1241 on node n2: 4 min left (until 13:04): the kernel ' +
      'restarts in a new job then: its variables are lost.',
    '(Click to ask Slurm again.)'
  ]);
});

test('warnings say when and what happens', () => {
  const s = status();
  assert.equal(serverWarning(s.server!, 900, NOW + 3000),
    "Your server's job ends in 15 min (at 14:05): your server stops then: save your work.");
  assert.equal(kernelWarning(RUNNING, 280, NOW, { k2: 'b.ipynb' }),
    'The job of the kernel of b.ipynb (Slurm job 1241) ends in 5 min (at 13:04): the ' +
    'kernel restarts in a new job then: its variables are lost.');
  assert.equal(waitingNotice(WAITING),
    'Kernel job 1240 waits: the nodes it needs are busy with other jobs; place 2 of 3 in ' +
    'the queue');
  assert.equal(waitingNotice({ ...WAITING, waiting_brief: undefined }, { k1: 'a.ipynb' }),
    'Kernel job 1240 waits: the nodes it needs are busy with other jobs (Resources); ' +
    'place 2 of 3 in the queue (a.ipynb)');
});

test('each warning once per job, as the time left falls to it', () => {
  const w = new Warnings();
  const minutes = [15, 5];
  assert.equal(w.due('a', 16 * 60, minutes), null);
  assert.equal(w.due('a', 15 * 60, minutes), 15);
  assert.equal(w.due('a', 14 * 60, minutes), null); // (given)
  assert.equal(w.due('a', 6 * 60, minutes), null);
  assert.equal(w.due('a', 4 * 60, minutes), 5);
  assert.equal(w.due('a', 60, minutes), null);
  assert.equal(w.due('a', 0, minutes), null);
  // Another job: its own.
  assert.equal(w.due('b', 10 * 60, minutes), 15);
});

test('a limit cut past two times warns once, with the nearer', () => {
  const w = new Warnings();
  assert.equal(w.due('a', 30 * 60, [15, 5]), null);
  assert.equal(w.due('a', 4 * 60, [15, 5]), 5);
  assert.equal(w.due('a', 3 * 60, [15, 5]), null);
});

test('a limit raised again warns again when the time comes', () => {
  const w = new Warnings();
  assert.equal(w.due('a', 14 * 60, [15, 5]), 15);
  assert.equal(w.due('a', 60 * 60, [15, 5]), null); // (raised: re-armed)
  assert.equal(w.due('a', 15 * 60, [15, 5]), 15);
  w.keepOnly(['b']);
  assert.equal(w.due('a', 14 * 60, [15, 5]), 15); // (forgotten: a new job's)
});

test('asks often while a kernel job waits or a kernel starts', () => {
  assert.equal(pollDelayMs(null), 30_000);
  assert.equal(pollDelayMs(status()), 30_000);
  assert.equal(pollDelayMs(status({ kernels: [WAITING] })), 5_000);
  assert.equal(pollDelayMs(status(), true), 5_000);
  assert.equal(pollDelayMs(status({ poll_seconds: 60, pending_poll_seconds: 2 })), 60_000);
  assert.equal(pollDelayMs(status({ poll_seconds: 3, kernels: [WAITING] })), 3_000);
  assert.equal(pollDelayMs(status({ poll_seconds: 0.01 })), 1_000);
});
