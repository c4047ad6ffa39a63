/*
 * dmlw: the device-mapper calls the log-writes mode of the test image needs, and nothing else.
 * Built static for aarch64 by hw-tests/image/build; runs in the guest's initramfs (no udev, no
 * libdevmapper). It talks to /dev/mapper/control with the DM ioctls of <linux/dm-ioctl.h>.
 *
 *   dmlw create NAME DATA_DEV LOG_DEV   a `log-writes` target over DATA_DEV logging to LOG_DEV,
 *                                       live at once; prints its MAJOR:MINOR
 *   dmlw mark NAME TEXT                 one mark (`dmsetup message NAME 0 mark TEXT`)
 *   dmlw marks NAME CHANNEL             a mark per line read from CHANNEL (a virtio-serial
 *                                       port), in order, until the line `end`; after each
 *                                       mark, `placed TEXT` goes back on CHANNEL
 *   dmlw status NAME                    the target's status: `<entries logged> <last sector>`
 *   dmlw remove NAME                    removes the device (the target writes its last entries
 *                                       and the final log super block first)
 *
 * A mark's text is [A-Za-z0-9._-], 1 to 64 characters (the target takes one word).
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/dm-ioctl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define BUF_SIZE 16384
#define MARK_MAX 64

/* The ioctl buffer: a dm_ioctl header, then the command's data. 8-byte aligned. */
static uint64_t buf_words[BUF_SIZE / 8];

static int control = -1;

static void die(const char *what)
{
	fprintf(stderr, "dmlw: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void open_control(void)
{
	control = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (control >= 0)
		return;
	/* devtmpfs names the node mapper/control; make it if it is missing (misc 10:236). */
	mkdir("/dev/mapper", 0755);
	if (mknod("/dev/mapper/control", S_IFCHR | 0600, makedev(10, 236)) && errno != EEXIST)
		die("mknod /dev/mapper/control");
	control = open("/dev/mapper/control", O_RDWR | O_CLOEXEC);
	if (control < 0)
		die("open /dev/mapper/control");
}

/* A fresh header for NAME; returns where the command's data starts. */
static char *prepare(const char *name)
{
	struct dm_ioctl *io = (struct dm_ioctl *)buf_words;

	if (strlen(name) >= DM_NAME_LEN) {
		fprintf(stderr, "dmlw: device name too long\n");
		exit(2);
	}
	memset(buf_words, 0, sizeof(buf_words));
	io->version[0] = DM_VERSION_MAJOR;
	io->data_size = sizeof(buf_words);
	io->data_start = sizeof(struct dm_ioctl);
	strcpy(io->name, name);
	return (char *)buf_words + io->data_start;
}

static struct dm_ioctl *call(unsigned long request, const char *what)
{
	if (control < 0)
		open_control();
	if (ioctl(control, request, buf_words))
		die(what);
	return (struct dm_ioctl *)buf_words;
}

static dev_t block_dev(const char *path, uint64_t *sectors)
{
	struct stat st;
	uint64_t bytes;
	int fd;

	if (stat(path, &st) || !S_ISBLK(st.st_mode)) {
		fprintf(stderr, "dmlw: %s is not a block device\n", path);
		exit(2);
	}
	if (sectors) {
		fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0 || ioctl(fd, BLKGETSIZE64, &bytes))
			die(path);
		close(fd);
		*sectors = bytes / 512;
	}
	return st.st_rdev;
}

static int create(const char *name, const char *data_path, const char *log_path)
{
	uint64_t sectors;
	dev_t data = block_dev(data_path, &sectors);
	dev_t log = block_dev(log_path, NULL);
	struct dm_target_spec *spec;
	struct dm_ioctl *io;
	char *params;
	size_t used;

	prepare(name);
	io = call(DM_DEV_CREATE, "DM_DEV_CREATE");
	uint64_t dev = io->dev;

	spec = (struct dm_target_spec *)prepare(name);
	io = (struct dm_ioctl *)buf_words;
	io->target_count = 1;
	spec->sector_start = 0;
	spec->length = sectors;
	strcpy(spec->target_type, "log-writes");
	params = (char *)(spec + 1);
	snprintf(params, 64, "%u:%u %u:%u", major(data), minor(data), major(log), minor(log));
	used = sizeof(*spec) + strlen(params) + 1;
	spec->next = (used + 7) & ~(size_t)7;
	call(DM_TABLE_LOAD, "DM_TABLE_LOAD (log-writes)");

	/* No DM_SUSPEND_FLAG: this resumes the device, making the loaded table live. */
	prepare(name);
	call(DM_DEV_SUSPEND, "DM_DEV_SUSPEND (resume)");
	printf("%u:%u\n", major(dev), minor(dev));
	return 0;
}

static int valid_mark(const char *text)
{
	size_t n = strlen(text), i;

	if (n == 0 || n > MARK_MAX)
		return 0;
	for (i = 0; i < n; i++) {
		char c = text[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '.' || c == '_' || c == '-'))
			return 0;
	}
	return 1;
}

static void mark(const char *name, const char *text)
{
	struct dm_target_msg *msg;

	if (!valid_mark(text)) {
		fprintf(stderr, "dmlw: invalid mark \"%s\"\n", text);
		exit(2);
	}
	msg = (struct dm_target_msg *)prepare(name);
	msg->sector = 0;
	snprintf(msg->message, 8 + MARK_MAX, "mark %s", text);
	call(DM_TARGET_MSG, "DM_TARGET_MSG (mark)");
}

static void report_placed(int fd, const char *text)
{
	char out[16 + MARK_MAX];
	int n = snprintf(out, sizeof(out), "placed %s\n", text);

	/* Only a host waiting for it reads this; a failure is not the log's business. */
	if (write(fd, out, n) != n)
		fprintf(stderr, "dmlw: could not report mark %s: %s\n", text, strerror(errno));
}

static void pause_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

/*
 * A mark per line from CHANNEL, each placed as soon as its line is read and then reported back
 * (`placed TEXT`: the mark is in the target's queue, ahead of every write logged later). A
 * virtio-serial port reads as end-of-file while the host side is not connected: that is waited
 * out, not an end.
 */
static int marks(const char *name, const char *channel)
{
	char line[MARK_MAX + 2];
	size_t len = 0;
	unsigned long count = 0;
	int fd = open(channel, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die(channel);
	printf("dmlw: placing marks from %s on %s\n", channel, name);
	fflush(stdout);
	for (;;) {
		char chunk[512];
		ssize_t n = read(fd, chunk, sizeof(chunk));
		ssize_t i;

		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die(channel);
		if (n == 0) {
			pause_ms(20);
			continue;
		}
		for (i = 0; i < n; i++) {
			if (chunk[i] != '\n') {
				if (len > MARK_MAX) {
					fprintf(stderr, "dmlw: line longer than %d on %s\n", MARK_MAX, channel);
					return 1;
				}
				line[len++] = chunk[i];
				continue;
			}
			line[len] = 0;
			len = 0;
			if (!strcmp(line, "end")) {
				printf("dmlw: %lu marks placed; end\n", count);
				return 0;
			}
			mark(name, line);
			count++;
			report_placed(fd, line);
		}
	}
}

static int status(const char *name)
{
	struct dm_ioctl *io;
	struct dm_target_spec *spec;

	prepare(name);
	io = call(DM_TABLE_STATUS, "DM_TABLE_STATUS");
	if (io->target_count != 1) {
		fprintf(stderr, "dmlw: %s has %u targets\n", name, io->target_count);
		return 1;
	}
	spec = (struct dm_target_spec *)((char *)io + io->data_start);
	printf("%s\n", (char *)(spec + 1));
	return 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: dmlw create NAME DATA_DEV LOG_DEV | mark NAME TEXT | "
			"marks NAME CHANNEL | status NAME | remove NAME\n");
	return 2;
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "create"))
		return create(argv[2], argv[3], argv[4]);
	if (argc == 4 && !strcmp(argv[1], "mark")) {
		mark(argv[2], argv[3]);
		return 0;
	}
	if (argc == 4 && !strcmp(argv[1], "marks"))
		return marks(argv[2], argv[3]);
	if (argc == 3 && !strcmp(argv[1], "status"))
		return status(argv[2]);
	if (argc == 3 && !strcmp(argv[1], "remove")) {
		prepare(argv[2]);
		call(DM_DEV_REMOVE, "DM_DEV_REMOVE");
		return 0;
	}
	return usage();
}
