"""Where things are inside a launcher Pod (KubeVirt's paths where it has them), and its
migration port: constants only, so `pvlun launch --help` needs nothing else."""

PRIVATE_DIR = "/var/run/kubevirt-private"  # emptyDir "private": the run directory, Filesystem claims below it
RUN_DIR = PRIVATE_DIR + "/vm"  # QEMU's run directory: serial log, QMP and launcher sockets
FILESYSTEM_DIR = PRIVATE_DIR + "/vmi-disks"  # KubeVirt's hostdisk.GetMountedHostDiskDir
EPHEMERAL_DIR = "/var/run/kubevirt-ephemeral-disks"  # emptyDir "ephemeral-disks"
DISK_DIR = EPHEMERAL_DIR + "/disk-data"  # cloud-init seeds and emptyDisks
BLOCK_DIR = "/dev/pvlun"
DISK_IMG = "disk.img"
VMI_DIR = "/var/run/pvlun/vmi"
VMI_FILE = VMI_DIR + "/vmi.json"
TOKEN_DIR = "/var/run/pvlun/migration"
TOKEN_FILE = TOKEN_DIR + "/token"
MIGRATION_PORT = 49152  # KubeVirt's direct migration port
