/**
 * A kernel's session saved, restored and moved on the user's request
 * (docs/user/kernel-state.md): three commands in the palette's Kernel
 * category, for the current notebook's kernel, each one call of the
 * server's `chspawner/api/kernels/ID/...` (chspawner.persist.kernel_state).
 * The kernel's own words on what it saved or brought back are shown in a
 * notification; a kernel without the session recorder says so.
 */
import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, Notification } from '@jupyterlab/apputils';
import { INotebookTracker } from '@jupyterlab/notebook';
import { ServerConnection } from '@jupyterlab/services';

const PLUGIN_ID = '@chspawner/jupyterlab-persist:kernel-session';
const CATEGORY = 'Kernel';

/** One command: its id, label, the call's last path part, what runs meanwhile. */
interface IAction {
  id: string;
  label: string;
  call: 'snapshot' | 'restore' | 'move';
  doing: string;
}

const ACTIONS: IAction[] = [
  { id: 'chspawner:save-kernel-session', label: 'Save Kernel Session',
    call: 'snapshot', doing: 'Saving the kernel\'s session…' },
  { id: 'chspawner:restore-kernel-session', label: 'Restore Kernel Session',
    call: 'restore', doing: 'Restoring the kernel\'s last saved session…' },
  { id: 'chspawner:move-kernel', label: 'Move Kernel to a New Job',
    call: 'move', doing: 'Moving the kernel to a new job, its session with it…' }
];

/** The report's words, or why there are none. */
async function words(response: Response): Promise<{ ok: boolean; message: string }> {
  try {
    const report = await response.json();
    return { ok: Boolean(report.ok), message: String(report.message ?? '') };
  } catch {
    return { ok: false, message: `the server answered ${response.status}` };
  }
}

function activate(app: JupyterFrontEnd, tracker: INotebookTracker,
                  palette: ICommandPalette | null): void {
  const kernelId = (): string | null =>
    tracker.currentWidget?.sessionContext.session?.kernel?.id ?? null;
  for (const action of ACTIONS) {
    app.commands.addCommand(action.id, {
      label: action.label,
      caption: `${action.label} (chspawner)`,
      isEnabled: () => kernelId() !== null,
      execute: async () => {
        const id = kernelId();
        if (id === null) {
          return;
        }
        const settings = app.serviceManager.serverSettings;
        const shown = Notification.emit(action.doing, 'in-progress', { autoClose: false });
        let result: { ok: boolean; message: string };
        try {
          const response = await ServerConnection.makeRequest(
            `${settings.baseUrl}chspawner/api/kernels/${encodeURIComponent(id)}/${action.call}`,
            { method: 'POST', body: '{}' }, settings);
          result = response.status === 404
            ? { ok: false, message: 'this server does not save kernel sessions' }
            : await words(response);
        } catch (e) {
          result = { ok: false, message: `the server did not answer: ${e}` };
        }
        Notification.update({
          id: shown,
          message: result.message || (result.ok ? 'Done.' : 'It did not work.'),
          type: result.ok ? 'success' : 'error',
          autoClose: result.ok ? 10_000 : false
        });
      }
    });
    palette?.addItem({ command: action.id, category: CATEGORY });
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: "A kernel's session saved, restored, or moved to a new job, on request",
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ICommandPalette],
  activate
};

export default plugin;
