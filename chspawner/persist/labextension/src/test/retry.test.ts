// Unit tests of retry.ts: a connection JupyterLab gave up on, tried again.
import { strict as assert } from 'node:assert';
import { test } from 'node:test';

import { FIRST_RETRY_MS, IClock, MAX_RETRY_MS, Reconnector } from '../retry';

class FakeKernel {
  connectionStatus = 'connected';
  status = 'idle';
  isDisposed = false;
  reconnects = 0;
  reconnect(): Promise<void> {
    this.reconnects += 1;
    this.connectionStatus = 'connecting';
    return new Promise(() => undefined);
  }
}

class FakeClock implements IClock {
  timers: Array<{ fn: () => void; ms: number } | null> = [];
  isOnline = true;
  setTimeout(fn: () => void, ms: number): unknown {
    this.timers.push({ fn, ms });
    return this.timers.length - 1;
  }
  clearTimeout(handle: unknown): void {
    this.timers[handle as number] = null;
  }
  online(): boolean {
    return this.isOnline;
  }
  /** The pending timers' delays. */
  pending(): number[] {
    return this.timers.filter(t => t !== null).map(t => t!.ms);
  }
  fire(): void {
    const i = this.timers.findIndex(t => t !== null);
    const t = this.timers[i]!;
    this.timers[i] = null;
    t.fn();
  }
}

function givenUp(kernel: FakeKernel, r: Reconnector): void {
  kernel.connectionStatus = 'disconnected';
  r.statusChanged('disconnected');
}

test('tries again after JupyterLab gives up, a delay doubling up to a minute', () => {
  const kernel = new FakeKernel();
  const clock = new FakeClock();
  const r = new Reconnector(kernel, clock);
  const delays: number[] = [];
  for (let i = 0; i < 9; i++) {
    givenUp(kernel, r);
    delays.push(...clock.pending());
    clock.fire();
    assert.equal(kernel.reconnects, i + 1);
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000, 16000, 32000, 60000, 60000, 60000]);
  // Connected again: the next loss starts from the first delay.
  kernel.connectionStatus = 'connected';
  r.statusChanged('connected');
  givenUp(kernel, r);
  assert.deepEqual(clock.pending(), [FIRST_RETRY_MS]);
  assert.equal(MAX_RETRY_MS, 60000);
});

test('back online or shown again: at once, once', () => {
  const kernel = new FakeKernel();
  const clock = new FakeClock();
  const r = new Reconnector(kernel, clock);
  r.nudge(); // connected: nothing to do
  assert.equal(kernel.reconnects, 0);
  givenUp(kernel, r);
  r.nudge();
  assert.equal(kernel.reconnects, 1);
  assert.deepEqual(clock.pending(), []); // the timer was replaced by the try
  r.nudge(); // now connecting: JupyterLab's own tries run
  assert.equal(kernel.reconnects, 1);
});

test('offline: no try, only a later look; a dead or disposed kernel is left alone', () => {
  const kernel = new FakeKernel();
  const clock = new FakeClock();
  const r = new Reconnector(kernel, clock);
  clock.isOnline = false;
  givenUp(kernel, r);
  clock.fire();
  assert.equal(kernel.reconnects, 0);
  assert.equal(clock.pending().length, 1);
  clock.isOnline = true;
  kernel.status = 'dead';
  clock.fire();
  r.nudge();
  assert.equal(kernel.reconnects, 0);

  const other = new FakeKernel();
  const r2 = new Reconnector(other, clock);
  givenUp(other, r2);
  r2.dispose();
  assert.deepEqual(clock.pending(), []);
  r2.nudge();
  assert.equal(other.reconnects, 0);
});
